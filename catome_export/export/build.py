"""The engine folder build: model -> staged ONNX graphs (+ TensorRT engines) -> audited, verified folder.

:class:`~catome_export.engine.options.BuildOptions` is the build's only input (validated on
construction); :func:`build_folder` runs it, with the folder handling of :mod:`catome_export.engine.folder`. The verification that decides whether the
folder is installed is passed in (:data:`Verifier`, returning a
:class:`VerifyVerdict`): :mod:`catome_export.workflows.build` gives it the
runtime's, so this module needs neither the backends nor the runtime.

A build never leaves a folder that a later load would trust half-made, and
never damages a previous good build:

1. a lock file ``<parent>/.<name>.lock`` (holding the pid) keeps a second
   build out of the same folder; a lock left by a dead process is taken over;
2. everything is built in ``<parent>/.<name>.tmp-<pid>`` beside the target:
   stage graphs, TensorRT plans where asked, the audit, then ``manifest.json``
   LAST (a folder without a manifest is never loaded);
3. verification runs on that temp folder; only a verified build goes live:
   the old folder is renamed aside, the new one renamed in, the old one
   deleted. A crash between the two renames leaves the old build intact at
   ``.<name>.old-<pid>``, and the next build puts it back first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from catome_export.analysis.calibrate import resolve_schedule
from catome_export.choices import EngineBackend, Precision
from catome_export.defaults import (
    DEFAULT_OPT_MERGE_FRACTION,
)
from catome_export.dtypes import precision_dtype
from catome_export.engine.folder import (
    BuildLock, check_foreign, check_target, keep_unplaced, recover_leftovers, swap_into_place,
)
from catome_export.engine.options import BuildOptions
from catome_export.errors import CatomeError
from catome_export.export.audit import AuditReport, audit_stages
from catome_export.memory import check_available, gb, verify_need
from catome_export.engine.controlnet import ControlNetInputs, ControlNetRecord
from catome_export.engine.io_names import MODEL_OUTPUT, site_input_name, site_of_input
from catome_export.engine.manifest import (
    FeatureCacheRecord, Manifest, ModelRecord, tool_versions,
)
from catome_export.export.onnx_export import (
    ExportedStage, example_inputs, export_stage, ort_max_diff, ort_session,
)
from catome_export.export.ort_optimize import OptimizedGraph, optimize_graph
from catome_export.engine.shapes import ShapeRanges
from catome_export.engine.specs import StageSpec
from catome_export.export.stages import cached_branches, cut_unet
from catome_export.featurecache import UNetLayout
from catome_export.export.trt_build import build_engines
from catome_export.lora.refit import lora_record
from catome_export.merging.schedules import AutoSchedule
from catome_export.merging.settings import MergeSettings
from catome_export.models import find_merge_sites, load_unet, model_info, weights_hash
from catome_export.models.registry import (
    ModelInfo,
)
from catome_export.models.sites import MergeSite

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
QUICK_CHECK_TOLERANCE = 1e-4
"""fp32 limit of the per-stage ONNX Runtime check right after export (times max(1, |output|))."""


@dataclass(frozen=True)
class VerifyVerdict:
    """The eager comparison's outcome as a build needs it: only ``ok`` installs a folder.

    A verifier (see :data:`Verifier`) must return one of these (or None when
    it cannot run here); anything else stops the build, so a report without a
    verdict can never install a folder.
    """

    ok: bool
    text: str
    """The comparison's summary (its first line goes into the error of a failed build)."""

    def __post_init__(self) -> None:
        if not isinstance(self.ok, bool):
            raise TypeError(f"VerifyVerdict.ok must be a bool, got {type(self.ok).__name__}")

    def summary(self) -> str:
        return self.text


Verifier = Callable[[Path, "BuildOptions", EngineBackend, list[str], Progress], "VerifyVerdict | None"]
"""``(folder, options, engine backend, notes, progress) -> verdict`` (None: skipped, with a note saying why)."""


@dataclass
class BuildResult:
    """What a build made and measured."""

    manifest: Manifest
    engine_dir: Path
    stages: list[ExportedStage]
    audit: AuditReport
    quick_check: dict[int, float] | None
    """Per stage, max |ONNX Runtime - torch| at the example shape (None where skipped)."""
    verify: VerifyVerdict | None
    """The eager comparison's verdict (None when skipped)."""
    backend: EngineBackend
    """``ort`` or ``trt``: which engines the folder holds."""
    seconds: float
    notes: list[str] = field(default_factory=list)
    """Things skipped and why."""


# -- the build ----------------------------------------------------------------------------------------------
def _opt_latent(opts: BuildOptions) -> int:
    lo, hi = opts.resolution
    return min(max(opts.default_resolution, lo), hi) // 8


def _calibrate_schedule(opts: BuildOptions, schedule: AutoSchedule, unet: torch.nn.Module,
                        progress: Progress) -> MergeSettings:
    s = opts.settings
    progress(f"calibrating schedule {schedule.name} on the model")
    resolved = resolve_schedule(schedule, unet, schedule.step_base, threshold=s.threshold, ratio=s.ratio,
                                latent_hw=(_opt_latent(opts),) * 2, max_downsample=s.max_downsample,
                                stride=s.stride)
    return replace(s, schedule=resolved)


def build_folder(opts: BuildOptions, progress: Progress | None = None, *,
                 engine_backend: EngineBackend = EngineBackend.ORT,
                 verifier: Verifier | None = None) -> BuildResult:
    """Build the engine folder ``opts.out_dir`` (see the module docstring for the steps and atomicity).

    ``engine_backend``: the engines to make (``trt``: TensorRT plans too);
    ``verifier``: the eager comparison that decides whether the folder is
    installed (:func:`catome_export.workflows.build.run_build` passes the
    runtime's); without one, a build asked to verify records that it was not.
    An existing folder is replaced only when every file in it was made by a
    build (its manifest lists them); other files are refused before any work
    starts, unless ``opts.force`` (then they are removed with the old build).
    """
    say = progress or logger.info
    start = time.perf_counter()
    backend = EngineBackend.parse(engine_backend, "engine backend")
    target = opts.out_dir
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CatomeError(f"cannot create the folder {target.parent} for --out {target} ({exc.strerror or exc}): "
                          "choose an --out in a writable folder") from None
    with BuildLock(target.parent / f".{target.name}.lock", str(target)):
        recover_leftovers(target)
        check_target(target)
        check_foreign(target, opts.force)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        keep_tmp = False  # True once tmp is the installed build, or a failed one kept for inspection
        try:
            try:
                tmp.mkdir()
                result = _build_into(opts, tmp, backend, say, verifier)
            except OSError as exc:
                raise CatomeError(f"the build failed on a file operation ({exc}): check the free space and "
                                  f"permissions of {target.parent}; {target} was not changed") from exc
            if result.verify is not None and not result.verify.ok:
                failed = target.parent / f".{target.name}.failed"
                shutil.rmtree(failed, ignore_errors=True)
                try:
                    os.rename(tmp, failed)
                except OSError:
                    failed = tmp
                    keep_tmp = True
                summary = result.verify.summary()
                raise CatomeError(f"the engine does not match eager CA-ToMe ({summary.splitlines()[0] if summary else ''})"
                                  f"; it was not installed: {target} is unchanged, the failed build is in {failed} "
                                  f"(inspect it with catome-export verify {failed})")
            if not opts.force:
                check_foreign(target, False)  # put there while this build ran
            try:
                swap_into_place(tmp, target)
            except CatomeError as exc:  # the finished build is kept, and the message says where
                keep_tmp = True
                kept = keep_unplaced(tmp, target)
                raise CatomeError(f"{exc}; the finished build is kept in {kept} (move it to {target} yourself, "
                                  f"or build again)") from None
            keep_tmp = True
        finally:
            if not keep_tmp:
                shutil.rmtree(tmp, ignore_errors=True)
    result.manifest.engine_dir = target
    result.engine_dir = target
    result.seconds = time.perf_counter() - start
    say(f"built {target} in {result.seconds:.1f} s")
    return result


def _build_into(opts: BuildOptions, folder: Path, backend: EngineBackend, say: Progress,
                verifier: Verifier | None) -> BuildResult:
    notes: list[str] = []
    dtype = precision_dtype(opts.precision)
    say(f"loading {opts.model} ({opts.weights} weights, {opts.precision})")
    unet = load_unet(opts.model, weights=opts.weights, dtype=dtype)
    base_hash = weights_hash(unet)
    lora_files = _fuse_loras(unet, opts, folder, say)
    weights = sum(p.numel() for p in unet.parameters()) * torch.empty((), dtype=dtype).element_size()
    _check_free_space(folder, weights, fused=backend == EngineBackend.ORT and opts.ort_optimize,
                      trt=backend == EngineBackend.TRT)
    if opts.verify and verifier is not None and backend == EngineBackend.ORT and not torch.cuda.is_available():
        # the eager reference and the engine, both on the CPU, after the export
        check_available(verify_need(weights), f"verifying this build on the CPU (the eager U-Net, {gb(weights)}, and "
                        "the engine in ONNX Runtime at once)", "build with --no-verify here and check the engine with "
                        "catome-export verify on a machine with more memory, or close other programs", held=weights)
    settings = opts.settings
    if opts.schedule is not None:
        settings = _calibrate_schedule(opts, opts.schedule, unet, say)
    sites = find_merge_sites(unet, settings.max_downsample)
    stages = cut_unet(unet, sites, dtype, merge_crossattn=settings.merge_crossattn, merge_mlp=settings.merge_mlp,
                      max_stage_bytes=opts.max_stage_bytes, cache_branches=opts.branches, controlnet=opts.controlnet)
    examples = example_inputs(stages, sites, unet.config, dtype, stride=settings.stride)
    check_ort = opts.verify and opts.precision == Precision.FP32
    if opts.verify and not check_ort:
        notes.append("per-stage ONNX Runtime check skipped: ONNX Runtime's CPU kernels lack fp16 ScatterElements "
                     "(add); fp16 graphs run on TensorRT or ONNX Runtime CUDA")
    quick: dict[int, float] | None = {} if check_ort else None
    exported: list[ExportedStage] = []
    fused: dict[int, OptimizedGraph] = {}
    fuse = backend == EngineBackend.ORT and opts.ort_optimize
    n = len(stages)
    for spec, module in stages:
        say(f"exporting stage {spec.index + 1}/{n} ({_describe(spec)})")
        item = export_stage(spec, module, examples[spec.index], folder, opset=opts.opset, exporter=opts.exporter)
        line = f"  stage {spec.index + 1}/{n}: {item.file}, {item.seconds:.1f} s, {_mb(item.total_bytes)}"
        graphs = [(item.file, "the export is broken (try --exporter dynamo)")]
        if fuse:
            fused[spec.index] = optimize_graph(folder / item.file)
            graphs.append((fused[spec.index].file, "ONNX Runtime's fusions changed it (build with --ort-optimize off)"))
            line += f"; {fused[spec.index].file}: {_describe_fused(fused[spec.index])}"
        if quick is not None:
            try:
                diffs = [ort_max_diff(ort_session(folder / file), spec, module, examples[spec.index])
                         for file, _ in graphs]
            except CatomeError as exc:
                notes.append(f"per-stage ONNX Runtime check skipped ({exc})")
                quick = None
            else:
                quick[spec.index] = max(diffs)
                line += ", ORT max |diff| " + " / ".join(f"{d:.1e}" for d in diffs)
                with torch.no_grad():
                    scale = max(float(t.abs().max()) for t in module(*examples[spec.index]))
                for (file, fix), diff in zip(graphs, diffs):
                    if not diff <= QUICK_CHECK_TOLERANCE * max(1.0, scale):
                        raise CatomeError(f"stage {spec.index}'s ONNX graph {file} differs from the torch stage by "
                                          f"{diff:.2e} in ONNX Runtime: {fix}")
        say(line)
        exported.append(item)
    audit = audit_stages([folder / e.file for e in exported])
    say(audit.summary())
    for finding in audit.errors[:10]:
        say(f"  {finding}")
    if not audit.passed:
        if backend == EngineBackend.TRT:
            raise CatomeError(f"the stage graphs use ops TensorRT cannot parse ({len(audit.errors)} errors, first: "
                              f"{audit.errors[0]}); build with --engine-kind ort, or report the model layout")
        notes.append("the graphs would not parse in TensorRT (see the audit); ONNX Runtime can still run them")
    info = model_info(opts.model)
    manifest = _make_manifest(opts, unet, sites, stages, exported, settings, backend, audit, info,
                              base_hash=base_hash)
    graph_files = [e.file for e in exported] + [g.file for g in fused.values()]
    manifest.lora = lora_record(unet, folder, graph_files, lora_files, refittable=opts.refittable
                                and backend == EngineBackend.TRT)
    manifest.stages = tuple(replace(s, ort_optimized=fused[s.index].record()) if s.index in fused else s
                            for s in manifest.stages)
    del unet, stages, examples
    if backend == EngineBackend.TRT:
        _build_trt(folder, manifest, opts, say)
    manifest.save(folder)  # LAST: a folder without a manifest is never loaded
    verdict = None
    if opts.verify:
        if verifier is None:
            notes.append("verification skipped: this build was given no verifier (catome_export.workflows.build "
                         "verifies); check it with catome-export verify")
            say(notes[-1])
        else:
            verdict = verifier(folder, opts, backend, notes, say)
            if verdict is not None and not isinstance(verdict, VerifyVerdict):
                raise CatomeError(f"internal: the verifier returned a {type(verdict).__name__}, not a "
                                  "VerifyVerdict, so the build cannot tell whether it passed; it was not installed")
    return BuildResult(manifest=manifest, engine_dir=folder, stages=exported, audit=audit, quick_check=quick,
                       verify=verdict, backend=backend, seconds=0.0, notes=notes)


FREE_SPACE_MARGIN = 1.05, 256 << 20
"""(factor, bytes) over the estimated size of a build that the folder's disk must have free."""


def _check_free_space(folder: Path, weights: int, *, fused: bool, trt: bool) -> None:
    """Refuse, before the export, a build that cannot fit on the disk it is written to.

    The build writes the weights once as the stage graphs, once more as ONNX
    Runtime's fused copies (``--ort-optimize on``), or once more as TensorRT
    plans (about the weights' size); an existing build in the target folder
    stays until the new one replaces it. ``weights``: bytes of the U-Net's weights at the build's precision.
    """
    parts = [("the stage graphs", weights)]
    if fused:
        parts.append(("ONNX Runtime's fused copies", weights))
    if trt:
        parts.append(("TensorRT plans, about", weights))
    need = int(sum(n for _, n in parts) * FREE_SPACE_MARGIN[0]) + FREE_SPACE_MARGIN[1]
    free = shutil.disk_usage(folder).free
    if free < need:
        hint = "; --ort-optimize off writes the weights once (the ONNX Runtime backend then runs the standard " \
               "graphs)" if fused else ""
        detail = ", ".join(f"{what} {gb(n)}" for what, n in parts)
        raise CatomeError(f"this build writes about {gb(need)} ({detail}, and a margin) but {folder.parent} has "
                          f"{gb(free)} free: free some space or choose an --out on a larger disk{hint}")


def _describe_fused(graph: OptimizedGraph) -> str:
    ops = ", ".join(f"{count} {op}" for op, count in graph.fused.items()) or "no fused operators"
    left = f", {graph.attention_left} attention(s) left unfused" if graph.attention_left else ""
    return f"{ops}{left}, {graph.seconds:.1f} s"


def _describe(spec: StageSpec) -> str:
    parts = []
    if spec.site is not None:
        parts.append(f"site {spec.site}")
    if spec.next_site is not None:
        parts.append(f"-> {site_input_name(spec.next_site)}")
    elif MODEL_OUTPUT in spec.output_names:
        parts.append(f"-> {MODEL_OUTPUT}")
    else:
        parts.append("a piece without a merge site (cut for the feature cache or by size)")
    return ", ".join(parts)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _opt_fraction(opts: BuildOptions, settings: MergeSettings) -> float:
    if opts.opt_merge_fraction is not None:
        return float(opts.opt_merge_fraction)
    return settings.merge_fraction if settings.merge_fraction is not None else DEFAULT_OPT_MERGE_FRACTION


def _make_manifest(opts: BuildOptions, unet: torch.nn.Module, sites: list[MergeSite],
                   stages: list[tuple[StageSpec, torch.nn.Module]], exported: list[ExportedStage],
                   settings: MergeSettings, backend: EngineBackend, audit: AuditReport, info: ModelInfo, *,
                   base_hash: str | None = None) -> Manifest:
    channels = {}
    for spec, _ in stages:
        for t in spec.outputs:
            site = site_of_input(t.name)
            if site is not None:
                channels[site] = int(t.shape[-1])
    lo, hi = opts.resolution
    config = json.loads(json.dumps(dict(unet.config), default=lambda o: list(o) if isinstance(o, tuple) else str(o)))
    opt_latent = _opt_latent(opts)
    shapes = ShapeRanges(batch=opts.batch, latent_height=(lo // 8, hi // 8), latent_width=(lo // 8, hi // 8),
                         text_len=(info.text_len, info.text_len), opt_batch=opts.batch[1], opt_height=opt_latent,
                         opt_width=opt_latent, opt_text_len=info.text_len,
                         opt_merge_fraction=_opt_fraction(opts, settings),
                         text_dim=int(unet.config.cross_attention_dim))
    shapes.validate()
    build = opts.record()
    return Manifest(
        name=opts.name,
        model=ModelRecord(id=opts.model, weights=str(opts.weights),
                          weights_hash=base_hash if base_hash is not None else weights_hash(unet),
                          unet_config=config),
        precision=str(opts.precision), merge=settings,
        sites=tuple(replace(s, channels=channels.get(s.index)) for s in sites),
        shapes=shapes, stages=tuple(e.record(spec) for e, (spec, _) in zip(exported, stages)),
        engine_backend=str(EngineBackend.ORT), trt=None, tools=tool_versions(),
        feature_cache=None if not opts.branches else FeatureCacheRecord(
            cached_branches(stages, opts.branches, UNetLayout.of(unet)), opts.feature_cache),
        controlnet=_controlnet_record(stages) if opts.controlnet else None,
        build=build, extra={"audit": audit.to_dict(),
               "export": {"exporter": str(opts.exporter), "opset": opts.opset,
                          "ort_optimize": backend == EngineBackend.ORT and opts.ort_optimize,
                          "max_stage_bytes": opts.max_stage_bytes}},
    )


def _fuse_loras(unet: torch.nn.Module, opts: BuildOptions, folder: Path, say: Progress) -> Any:
    """Fuse ``opts.loras`` into the U-Net (catome_export.lora), keeping the base values of the weights they change
    and a copy of each file in the folder; None without LoRAs."""
    if not opts.loras:
        return None
    from catome_export.lora.refit import fuse_for_build

    say("fusing LoRA " + " + ".join(f"{s.path.name}:{s.scale:g}" for s in opts.loras) + " into the U-Net")
    return fuse_for_build(unet, opts.loras, folder)


def _controlnet_record(stages: list[tuple[StageSpec, torch.nn.Module]]) -> ControlNetRecord:
    found = ControlNetInputs.of([spec for spec, _ in stages])
    if found is None:
        raise CatomeError("internal: a --controlnet build cut stages without ControlNet residual inputs")
    return found.record()


def _build_trt(folder: Path, manifest: Manifest, opts: BuildOptions, say: Progress) -> None:
    """TensorRT engines for every stage (catome_export.export.trt_build), recorded in the manifest."""
    manifest.engine_dir = folder
    built = build_engines(folder, manifest, fp16=opts.precision == Precision.FP16, refittable=opts.refittable,
                          progress=lambda k, n, msg: say(f"  stage {k + 1}/{n}: {msg}"))
    built.apply(manifest)
    if manifest.lora is not None and opts.refittable:
        manifest.lora = replace(manifest.lora, refittable=True,
                                stripped=bool(built.record.extra.get("strip_plan", False)))
    manifest.tools = tool_versions()
