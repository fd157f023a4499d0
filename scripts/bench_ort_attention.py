"""Self-attention core on ONNX Runtime CPU: the unfused graph the stages export against ORT's fused op.

Usage:
    python scripts/bench_ort_attention.py [--batch 2] [--tokens 4096] [--heads 8] [--head-dim 40] [--repeats 4]

Builds two one-op-deep graphs over the same q, k, v [B, N, H*D]: the
unfused form the exported stages contain (reshape, transpose, MatMul, scale,
Softmax, MatMul) and ONNX Runtime's ``com.microsoft.MultiHeadAttention``
contrib op (CPU kernel; not standard ONNX, so not in the exported graphs,
which TensorRT must also read). Prints the median ms of each after one
warm-up run and the largest difference between their outputs. SD 1.5's top
level at 512 px is 4096 tokens, 8 heads of 40.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def graphs(b: int, n: int, h: int, d: int):
    from onnx import TensorProto, helper

    c = h * d
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [b, n, c]) for name in "qkv"]
    output = [helper.make_tensor_value_info("o", TensorProto.FLOAT, [b, n, c])]
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    fused = helper.make_model(helper.make_graph(
        [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=h)],
        "fused", inputs, output), opset_imports=opsets)
    split = helper.make_tensor("split", TensorProto.INT64, [4], [b, n, h, d])
    merge = helper.make_tensor("merge", TensorProto.INT64, [3], [b, n, c])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [d ** -0.5])
    nodes = []
    for name in "qkv":
        perm = [0, 2, 3, 1] if name == "k" else [0, 2, 1, 3]  # k goes in transposed: [B, H, D, N]
        nodes += [helper.make_node("Reshape", [name, "split"], [f"{name}4"]),
                  helper.make_node("Transpose", [f"{name}4"], [f"{name}h"], perm=perm)]
    nodes += [helper.make_node("MatMul", ["qh", "kh"], ["scores"]),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
              helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "vh"], ["heads"]),
              helper.make_node("Transpose", ["heads"], ["tokens"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["tokens", "merge"], ["o"])]
    unfused = helper.make_model(helper.make_graph(nodes, "unfused", inputs, output, [split, merge, scale]),
                                opset_imports=opsets[:1])
    return {"unfused (as exported)": unfused, "MultiHeadAttention (ORT contrib)": fused}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args(argv)

    import numpy as np
    import onnxruntime as ort

    from catome_export.backends.ort import OrtOptions, session_options

    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal((args.batch, args.tokens, args.heads * args.head_dim), dtype=np.float32)
             for name in "qkv"}
    print(f"attention core, B={args.batch}, N={args.tokens}, {args.heads} heads of {args.head_dim}, "
          f"median of {args.repeats} after 1 warm-up run")
    outputs = {}
    for label, model in graphs(args.batch, args.tokens, args.heads, args.head_dim).items():
        session = ort.InferenceSession(model.SerializeToString(), session_options(OrtOptions()),
                                       providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            outputs[label] = session.run(None, feeds)[0]
            times.append((time.perf_counter() - start) * 1e3)
        print(f"  {label:<34} {statistics.median(times):8.1f} ms")
    first, second = outputs.values()
    print(f"  max |difference| {float(np.abs(first - second).max()):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
