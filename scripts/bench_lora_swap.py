"""Time a LoRA swap by refit against a rebuild with the LoRA (docs/lora.md), on one machine, ONNX Runtime.

    python scripts/bench_lora_swap.py --model sd15 --weights random --resolution 512 --batch 2 \
        --work /tmp/lora-bench --out benchmarks/results/lora_swap_sd15_random_512_cpu

Steps (each a separate ``catome-export`` process, timed by wall clock, with the
1-minute load average before and after, since the machine may be shared):

1. ``build`` of the base engine (no LoRA, ``--no-verify``): reused when ``--work`` holds it;
2. two random LoRAs of the model's attention projections (seeded, rank ``--rank``),
   written in diffusers format (``unet.<module>.lora.down/up.weight`` and diffusers'
   ``lora_adapter_metadata``);
3. ``refit`` none -> a, a -> b, b -> none (the CLI, import time included);
4. in one process: ``Runtime.load`` then ``runtime.set_lora`` a, b, none (the swap
   of a loaded engine: new sessions for the stages whose weights change);
5. ``build --lora a`` (``--no-verify``): what a swap costs without refit.

Writes ``<out>.json`` (every figure and command) and ``<out>.txt`` (a summary).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's catome_export, as the commands below (run from REPO) use


def load() -> float:
    return round(os.getloadavg()[0], 2)


def run(cmd: list[str], log: Path) -> dict:
    before = load()
    start = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}); see {log}")
    return {"command": shlex.join(cmd), "seconds": round(seconds, 2), "load_before": before, "load_after": load()}


def write_lora(model: str, weights: str, path: Path, seed: int, rank: int, alpha: float) -> dict:
    import torch
    from safetensors.torch import save_file

    from catome_export.lora.files import targets_from_config
    from catome_export.models.registry import unet_config_of

    del weights  # the LoRA depends only on the layer shapes
    targets = targets_from_config(unet_config_of(model))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, target in sorted(targets.items()):
        if target.kind != "linear" or not name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                                         "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")):
            continue
        out_f, in_f = target.shape
        tensors[f"unet.{name}.lora.down.weight"] = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5
        tensors[f"unet.{name}.lora.up.weight"] = torch.randn(out_f, rank, generator=gen) * 0.01
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": rank, "unet.lora_alpha": alpha})}
    save_file(tensors, str(path), metadata=meta)
    return {"file": str(path), "modules": len(tensors) // 2, "rank": rank, "alpha": alpha, "bytes": path.stat().st_size}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15")
    p.add_argument("--weights", default="random")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--work", type=Path, default=Path("/tmp/lora-bench"))
    p.add_argument("--out", type=Path, required=True, help="results path without extension")
    p.add_argument("--skip-rebuild", action="store_true", help="leave out step 5 (the rebuild)")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "bench.log"
    exe = [sys.executable, "-m", "catome_export.cli"]
    common = ["--model", args.model, "--weights", args.weights, "--resolution", str(args.resolution),
              "--batch", str(args.batch), "--backend", "ort", "--no-verify"]
    engine = args.work / "engine"
    result: dict = {"script": shlex.join([sys.executable, *sys.argv]), "machine": platform.node(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "steps": {}}
    steps = result["steps"]
    if not (engine / "manifest.json").is_file():
        steps["build_base"] = run([*exe, "build", *common, "--out", str(engine)], log)
    else:
        steps["build_base"] = {"reused": str(engine)}
    loras = {name: args.work / f"{name}.safetensors" for name in ("a", "b")}
    result["loras"] = {name: write_lora(args.model, args.weights, path, seed, args.rank, float(args.rank))
                       for (name, path), seed in zip(loras.items(), (1, 2))}
    steps["refit_none_to_a"] = run([*exe, "refit", "--engine", str(engine), "--lora", f"{loras['a']}:0.8"], log)
    steps["refit_a_to_b"] = run([*exe, "refit", "--engine", str(engine), "--lora", f"{loras['b']}:0.8"], log)
    steps["refit_b_to_none"] = run([*exe, "refit", "--engine", str(engine), "--none"], log)

    from catome_export.runtime import Runtime

    before = load()
    start = time.perf_counter()
    runtime = Runtime.load(engine, backend="ort-cpu")
    steps["runtime_load"] = {"seconds": round(time.perf_counter() - start, 2), "load_before": before,
                             "load_after": load()}
    for key, value in (("set_lora_none_to_a", f"{loras['a']}:0.8"), ("set_lora_a_to_b", f"{loras['b']}:0.8"),
                       ("set_lora_b_to_none", None)):
        before = load()
        start = time.perf_counter()
        runtime.set_lora(value)
        steps[key] = {"seconds": round(time.perf_counter() - start, 2), "load_before": before, "load_after": load()}
    runtime.close()
    if not args.skip_rebuild:
        steps["rebuild_with_a"] = run([*exe, "build", *common, "--lora", f"{loras['a']}:0.8", "--out",
                                       str(args.work / "engine-a")], log)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# LoRA swap: refit vs rebuild ({args.model}, {args.weights} weights, {args.resolution} px, batch "
             f"{args.batch}, ONNX Runtime CPU, {os.cpu_count()} CPUs)", f"command: {result['script']}",
             f"started {result['started']}, finished {result['finished']}",
             f"LoRAs: {result['loras']['a']['modules']} modules, rank {args.rank}", ""]
    for key, step in steps.items():
        if "seconds" in step:
            lines.append(f"{key:22s} {step['seconds']:9.2f} s   load {step['load_before']} -> {step['load_after']}")
        else:
            lines.append(f"{key:22s} reused {step['reused']}")
    if "rebuild_with_a" in steps:
        refit = steps["refit_none_to_a"]["seconds"]
        lines.append("")
        lines.append(f"rebuild / refit (CLI, none -> a): {steps['rebuild_with_a']['seconds'] / refit:.1f}x")
    args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
