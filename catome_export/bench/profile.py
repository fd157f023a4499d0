"""Where a step spends its time: per stage, per operator type and per kind of work.

The stage graphs of an engine (and the unstaged graph) are loaded into ONNX
Runtime sessions with the benchmark's session options plus
``SessionOptions.enable_profiling``, wrapped in the ONNX Runtime backend's own
stage runners, and driven by a :class:`~catome_export.runtime.Runtime` built
from them, so the controller, the plans and the IO binding are those of a
normal run. After a warm-up checkpoint call, ``calls`` cached calls are run per
merge fraction; their ``model_run`` windows in each session's trace select
the kernel events that count, summed by operator type.

Kernel times are also grouped by kind of work (:data:`GROUPS`): the
attention products and softmax of self-attention (``attn1``) and of
cross-attention (``attn2``), convolutions, the other matrix products
(projections, feed-forward), the merge / unmerge gathers and scatters, and
the rest. :func:`profile_eager` gives the same groups for eager PyTorch from
``torch.profiler`` (self times of aten ops).

Profiling adds a little time per node; use it for shares, not for headline
latencies (those come from :func:`~catome_export.bench.runner.run_bench`).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from catome_export.bench.measure import BENCH_SCHEDULE, Inputs
from catome_export.errors import CatomeError
from catome_export.engine.engine import Engine, EngineSource
from catome_export.engine.io_names import SAMPLE, TEXT, TIMESTEP

logger = logging.getLogger(__name__)


def _profiled_session(path: Path, options: Any, prefix: Path) -> Any:
    import onnxruntime as ort

    from catome_export.backends.ort import session_options

    so = session_options(options)
    so.enable_profiling = True
    so.profile_file_prefix = str(prefix)
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


GROUPS = ("self-attention core", "cross-attention core", "conv", "other matmul", "merge/unmerge", "other")
"""Kinds of work kernels are grouped into."""
_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
_MATMULS = ("MatMul", "Gemm", "FusedMatMul", "MatMulNBits")


def ort_group(node: str, op: str) -> str:
    """The kind of work of an ONNX Runtime kernel from its node name and op type."""
    if op in ("MatMul", "FusedMatMul", "Softmax", "MultiHeadAttention", "Attention") and not any(p in node for p in _PROJECTIONS):
        if "attn1/" in node:
            return "self-attention core"
        if "attn2/" in node:
            return "cross-attention core"
    if op in ("Conv", "FusedConv", "NchwcConv", "ReorderInput", "ReorderOutput"):
        return "conv"
    if op in _MATMULS:
        return "other matmul"
    if op in ("GatherElements", "ScatterElements"):
        return "merge/unmerge"
    return "other"


def _windows(events: list[dict]) -> list[tuple[float, float]]:
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    return [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in runs]


def summarise_trace(trace: Path, runs: Sequence[int]) -> dict[str, Any]:
    """Median ``model_run`` ms and per-op-type kernel ms per run over the runs at the given indices."""
    try:
        events = json.loads(Path(trace).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CatomeError(f"cannot read the ONNX Runtime profile {trace}: {exc}") from None
    windows = _windows(events)
    chosen = [windows[i] for i in runs if i < len(windows)]
    if not chosen:
        return {"run_ms": None, "ops_ms": {}, "runs": 0}
    kernels = [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")]
    ops: dict[str, float] = {}
    groups: dict[str, float] = {}
    for e in kernels:
        ts = float(e["ts"])
        if any(lo <= ts <= hi for lo, hi in chosen):
            op = str(e.get("args", {}).get("op_name", "?"))
            ms = float(e["dur"]) / 1e3
            ops[op] = ops.get(op, 0.0) + ms
            group = ort_group(str(e.get("name", "")), op)
            groups[group] = groups.get(group, 0.0) + ms
    n = len(chosen)
    return {"run_ms": round(statistics.median((hi - lo) / 1e3 for lo, hi in chosen), 3),
            "ops_ms": {k: round(v / n, 3) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])},
            "groups_ms": {g: round(groups[g] / n, 3) for g in GROUPS if g in groups}, "runs": n}


def profile_engine(engine: EngineSource, inputs: Inputs, fractions: Sequence[float], calls: int,
                   ort_options: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """Per-stage, per-op times of the engine at each merge fraction (cached steps after a checkpoint).

    ``ort_options``: :class:`~catome_export.backends.ort.OrtOptions` values (threads included)."""
    from catome_export.backends.ort import OrtOptions, OrtStageRunner, stage_graph_file
    from catome_export.backends.torch_backend import manifest_dtype
    from catome_export.runtime.runtime import Runtime

    opened = Engine.open(engine)
    engine_dir, manifest = opened.path, opened.manifest
    out_dir.mkdir(parents=True, exist_ok=True)
    options = OrtOptions.from_mapping(ort_options)
    runners = []
    for stage in manifest.stages:
        session = _profiled_session(Path(engine_dir) / stage_graph_file(stage, options), options,
                                    out_dir / f"stage{stage.index}")
        runners.append(OrtStageRunner(session, stage.spec, torch.device("cpu"), options))
    base = manifest.merge
    runtime = Runtime.from_parts(runners, manifest.sites, base, unet_config=manifest.model.unet_config,
                      dtype=manifest_dtype(manifest), device="cpu", manifest=manifest, engine_dir=Path(engine_dir))
    windows: dict[float, list[int]] = {}
    done = 0
    try:
        for f in fractions:
            runtime.set_settings(replace(base, threshold=None, ratio=None, merge_fraction=float(f),
                                         schedule=BENCH_SCHEDULE))
            runtime.reset()
            runtime.unet(inputs.sample, inputs.timestep, encoder_hidden_states=inputs.text,
                         added_cond_kwargs=inputs.added)  # checkpoint
            done += 1
            windows[f] = list(range(done, done + calls))
            for _ in range(calls):
                runtime.unet(inputs.sample, inputs.timestep, encoder_hidden_states=inputs.text,
                             added_cond_kwargs=inputs.added)
                done += 1
        traces = [Path(r.session.end_profiling()) for r in runners]
    finally:
        runtime.close()
    result: dict[str, Any] = {}
    for f, runs in windows.items():
        stages = [summarise_trace(t, runs) | {"index": i, "trace": t.name} for i, t in enumerate(traces)]
        result[f"{f:g}"] = {"stages": stages, "ops_ms": _merge_ops(s["ops_ms"] for s in stages),
                            "groups_ms": _merge_ops((s.get("groups_ms", {}) for s in stages), order=GROUPS),
                            "stages_ms": round(sum(s["run_ms"] or 0.0 for s in stages), 3)}
    return result


def profile_unstaged(graph: Path, inputs: Inputs, calls: int, ort_options: Mapping[str, Any],
                     out_dir: Path) -> dict[str, Any]:
    """Per-op times of the unstaged graph (one warm-up run, then ``calls`` timed runs)."""
    from catome_export.backends.ort import OrtOptions, OrtStageRunner
    from catome_export.bench.unstaged import unstaged_spec

    out_dir.mkdir(parents=True, exist_ok=True)
    options = OrtOptions.from_mapping(ort_options)
    session = _profiled_session(graph, options, out_dir / "unstaged")
    dtype = "float16" if inputs.sample.dtype == torch.float16 else "float32"
    added = {k: int(v.shape[-1]) for k, v in (inputs.added or {}).items()}
    spec = unstaged_spec(dtype, int(inputs.sample.shape[1]), int(inputs.sample.shape[1]), int(inputs.text.shape[-1]),
                         added)
    runner = OrtStageRunner(session, spec, torch.device("cpu"), options)
    feeds = {SAMPLE: inputs.sample, TIMESTEP: inputs.timestep, TEXT: inputs.text, **(inputs.added or {})}
    for _ in range(calls + 1):
        runner.run(feeds)
    trace = Path(session.end_profiling())
    runner.close()
    summary = summarise_trace(trace, list(range(1, calls + 1)))
    return summary | {"trace": trace.name}


def _merge_ops(parts: Any, order: Sequence[str] | None = None) -> dict[str, float]:
    total: dict[str, float] = {}
    for ops in parts:
        for k, v in ops.items():
            total[k] = total.get(k, 0.0) + v
    keys = [k for k in order if k in total] if order is not None else sorted(total, key=lambda k: -total[k])
    return {k: round(total[k], 3) for k in keys}


def torch_group(op: str, shapes: Sequence[Any], text_len: int) -> str:
    """The kind of work of an aten op (self time) from its name and input shapes."""
    if "scaled_dot_product" in op or op in ("aten::baddbmm", "aten::bmm", "aten::_softmax", "aten::softmax"):
        keys = shapes[1] if len(shapes) > 1 and shapes[1] else []
        return "cross-attention core" if keys and text_len in tuple(keys)[-2:] else "self-attention core"
    if "convolution" in op:
        return "conv"
    if op in ("aten::addmm", "aten::mm", "aten::matmul", "aten::linear"):
        return "other matmul"
    if op in ("aten::gather", "aten::scatter_add", "aten::scatter_add_", "aten::scatter_reduce"):
        return "merge/unmerge"
    return "other"


def profile_eager(unet: torch.nn.Module, inputs: Inputs, calls: int) -> dict[str, Any]:
    """Self time of aten ops and their groups per call of the eager U-Net (one warm-up call, then ``calls``)."""
    from torch.profiler import ProfilerActivity, profile

    text_len = int(inputs.text.shape[1])
    with torch.inference_mode():
        unet(inputs.sample, inputs.timestep, inputs.text, added_cond_kwargs=inputs.added)
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(calls):
                unet(inputs.sample, inputs.timestep, inputs.text, added_cond_kwargs=inputs.added)
        wall = (time.perf_counter() - start) * 1e3 / calls
    ops: dict[str, float] = {}
    groups: dict[str, float] = {}
    for item in prof.key_averages(group_by_input_shape=True):
        ms = item.self_cpu_time_total / 1e3 / calls
        if ms <= 0:
            continue
        ops[item.key] = ops.get(item.key, 0.0) + ms
        group = torch_group(item.key, item.input_shapes or [], text_len)
        groups[group] = groups.get(group, 0.0) + ms
    return {"run_ms": round(wall, 3), "runs": calls,
            "ops_ms": {k: round(v, 3) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:40]},
            "groups_ms": {g: round(groups[g], 3) for g in GROUPS if g in groups}}


def profile_markdown(profile: dict[str, Any], top: int = 12) -> str:
    """Per-stage ms per merge fraction, the kinds of work and the top operator types of each configuration."""
    engine = profile.get("engine") or {}
    lines: list[str] = []
    grouped = {f"engine @{f}": v.get("groups_ms") or {} for f, v in engine.items()}
    if (profile.get("unstaged") or {}).get("groups_ms"):
        grouped["unstaged"] = profile["unstaged"]["groups_ms"]
    if (profile.get("eager") or {}).get("groups_ms"):
        grouped["eager (torch)"] = profile["eager"]["groups_ms"]
    grouped = {k: v for k, v in grouped.items() if v}
    if grouped:
        lines += ["| kind of work | " + " | ".join(f"{c} ms" for c in grouped) + " |",
                  "|---|" + "---|" * len(grouped)]
        for g in GROUPS:
            if any(g in v for v in grouped.values()):
                lines.append(f"| {g} | " + " | ".join(_cell(v.get(g)) for v in grouped.values()) + " |")
        lines.append("| all kernels | " + " | ".join(_cell(sum(v.values())) for v in grouped.values()) + " |")
        lines.append("")
    if engine:
        fractions = list(engine)
        lines += ["| stage | " + " | ".join(f"engine @{f} ms" for f in fractions) + " |",
                  "|---|" + "---|" * len(fractions)]
        n = len(next(iter(engine.values()))["stages"])
        for i in range(n):
            cells = [_cell(engine[f]["stages"][i]["run_ms"]) for f in fractions]
            lines.append(f"| {i} | " + " | ".join(cells) + " |")
        lines.append("| all stages | " + " | ".join(_cell(engine[f]["stages_ms"]) for f in fractions) + " |")
        lines.append("")
    configs = {f"engine @{f}": v["ops_ms"] for f, v in engine.items()}
    if profile.get("unstaged"):
        configs["unstaged"] = profile["unstaged"]["ops_ms"]
    if configs:
        ops = sorted({op for v in configs.values() for op in v},
                     key=lambda op: -max(v.get(op, 0.0) for v in configs.values()))[:top]
        lines += ["| op type | " + " | ".join(f"{c} ms" for c in configs) + " |",
                  "|---|" + "---|" * len(configs)]
        for op in ops:
            lines.append(f"| {op} | " + " | ".join(_cell(v.get(op)) for v in configs.values()) + " |")
        lines.append("| all kernels | " + " | ".join(_cell(sum(v.values())) for v in configs.values()) + " |")
    return "\n".join(lines) + "\n"


def _cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"
