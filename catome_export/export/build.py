"""``build_engine``: model -> staged ONNX graphs (+ TensorRT engines) -> audited, verified engine folder.

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
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from catome_export.dtypes import precision_dtype
from catome_export.errors import CatomeError
from catome_export.export.audit import AuditReport, audit_stages
from catome_export.export.fsutil import BuildLock, pid_alive
from catome_export.export.io_names import MODEL_OUTPUT, site_input_name, site_of_input
from catome_export.export.manifest import MANIFEST_FILE, PRECISIONS, Manifest, build_command, tool_versions
from catome_export.export.ort_optimize import OptimizedGraph, optimize_graph
from catome_export.export.onnx_export import (
    EXPORTERS, OPSET, ExportedStage, example_inputs, export_stage, ort_max_diff, ort_session,
)
from catome_export.merging.settings import MergeSettings

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
BUILD_BACKENDS = ("auto", "ort", "trt")
MIN_RESOLUTION = 64
MAX_RESOLUTION = 4096
QUICK_CHECK_TOLERANCE = 1e-4
"""fp32 limit of the per-stage ONNX Runtime check right after export (times max(1, |output|))."""


@dataclass(frozen=True)
class BuildOptions:
    """Everything a build needs to know (the CLI flags, validated)."""

    model: str
    """``tiny``, ``sd15`` or a local diffusers folder."""
    weights: str
    """``pretrained`` or ``random``."""
    precision: str = "fp32"
    backend: str = "auto"
    """``auto`` (TensorRT where it runs, else ONNX Runtime), ``ort`` or ``trt``."""
    resolution: tuple[int, int] = (256, 256)
    """(min, max) image side in pixels, multiples of 8."""
    batch: tuple[int, int] = (1, 2)
    """(min, max) batch size."""
    settings: MergeSettings = field(default_factory=MergeSettings)
    name: str = "tiny"
    out_dir: Path = Path("engines/tiny")
    verify: bool = True
    verify_steps: int = 10
    exporter: str = "torchscript"
    opset: int = OPSET
    default_resolution: int = 256
    """The model's usual resolution (the TensorRT opt shape, clamped into the range)."""
    opt_merge_fraction: float | None = None
    """Share of src tokens TensorRT profiles tune for (None: the merge settings' fraction, else 0.5)."""
    cli: dict = field(default_factory=dict)
    """The flags as given, for the manifest's rebuild command."""
    ort_optimize: bool = True
    """ONNX Runtime builds: also write each stage in ONNX Runtime's fused form (``stage_<k>.ort.onnx``,
    catome_export.export.ort_optimize), checked like the standard graph and listed in the manifest."""


@dataclass
class BuildResult:
    """What a build made and measured."""

    manifest: Manifest
    engine_dir: Path
    stages: list[ExportedStage]
    audit: AuditReport
    quick_check: dict[int, float] | None
    """Per stage, max |ONNX Runtime - torch| at the example shape (None where skipped)."""
    verify: Any | None
    """The runtime's VerifyReport (None when skipped)."""
    backend: str
    """``ort`` or ``trt``: which engines the folder holds."""
    seconds: float
    notes: list[str] = field(default_factory=list)
    """Things skipped and why."""


# -- options ------------------------------------------------------------------------------------------------
def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise CatomeError(f"{name} must be an int {bound}, got {value!r}")
    return value


def _check_resolution(name: str, value: Any) -> int:
    value = _check_int(name, value, MIN_RESOLUTION, MAX_RESOLUTION)
    if value % 8:
        raise CatomeError(f"{name} {value} is not a multiple of 8 (the VAE's downsampling): use e.g. "
                          f"{value - value % 8} or {value - value % 8 + 8}")
    return value


def make_options(model: str, weights: str | None = None, precision: str = "fp32", backend: str = "auto",
                 resolution: int | None = None, min_resolution: int | None = None,
                 max_resolution: int | None = None, batch: int | None = None, min_batch: int | None = None,
                 max_batch: int | None = None, settings: MergeSettings | None = None, name: str | None = None,
                 out_dir: str | Path | None = None, verify: bool = True, verify_steps: int = 10,
                 exporter: str = "torchscript", opset: int = OPSET, opt_merge_fraction: float | None = None,
                 cli: dict | None = None, ort_optimize: bool = True) -> BuildOptions:
    """Validate build arguments (CatomeError naming the fix for any bad one) and fill in the defaults."""
    from catome_export.models import MODELS, model_info
    from catome_export.models.registry import BUNDLED_ONLY

    if not isinstance(model, str) or not model:
        raise CatomeError("give a model: tiny, sd15, sd21, or a local diffusers folder")
    info = model_info(model)  # CatomeError for an unknown name or a folder without a U-Net config
    if info.added_conditioning:
        raise CatomeError(
            f"{model} needs SDXL's added conditioning (text_embeds, time_ids), which the engine export does not "
            "handle yet: run it eagerly (catome-export generate --model sdxl, or apply_catome on the pipeline)")
    if weights is None:
        weights = "random" if model in BUNDLED_ONLY else "pretrained"
    if weights not in ("pretrained", "random"):
        raise CatomeError(f"weights must be 'pretrained' or 'random', got {weights!r}")
    if model in BUNDLED_ONLY:
        weights = "random"  # the tiny models exist only with seeded random weights
    if precision not in PRECISIONS:
        raise CatomeError(f"precision must be fp32 or fp16, got {precision!r}")
    if backend not in BUILD_BACKENDS:
        raise CatomeError(f"backend must be one of {', '.join(BUILD_BACKENDS)}, got {backend!r}")
    if exporter not in EXPORTERS:
        raise CatomeError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    _check_int("opset", opset, 17, 21)
    default = info.default_resolution
    if resolution is not None:
        if min_resolution is not None or max_resolution is not None:
            raise CatomeError("give either --resolution or --min-resolution/--max-resolution, not both")
        lo = hi = _check_resolution("resolution", resolution)
    else:
        lo = _check_resolution("min resolution", min_resolution) if min_resolution is not None else None
        hi = _check_resolution("max resolution", max_resolution) if max_resolution is not None else None
        if lo is None and hi is None:
            lo = hi = default
        elif lo is None:
            lo = min(default, hi)  # type: ignore[type-var]
        elif hi is None:
            hi = max(default, lo)
    if lo > hi:  # type: ignore[operator]
        raise CatomeError(f"min resolution {lo} is larger than max resolution {hi}")
    if batch is not None:
        if min_batch is not None or max_batch is not None:
            raise CatomeError("give either --batch or --min-batch/--max-batch, not both")
        blo = bhi = _check_int("batch", batch, 1, 256)
    else:
        blo = _check_int("min batch", 1 if min_batch is None else min_batch, 1, 256)
        bhi = _check_int("max batch", max(2, blo) if max_batch is None else max_batch, 1, 256)
        if blo > bhi:
            raise CatomeError(f"min batch {blo} is larger than max batch {bhi}")
    _check_int("verify steps", verify_steps, 1, 1000)
    if opt_merge_fraction is not None and (isinstance(opt_merge_fraction, bool)
                                           or not isinstance(opt_merge_fraction, (int, float))
                                           or not 0.0 <= opt_merge_fraction <= 1.0):
        raise CatomeError(f"--opt-merge-fraction must be a number in [0, 1], got {opt_merge_fraction!r}")
    if not isinstance(ort_optimize, bool):
        raise CatomeError(f"ort_optimize must be true or false (--ort-optimize on|off), got {ort_optimize!r}")
    if name is None:
        name = model if model in MODELS else (Path(model).resolve().name or "model")
    if not name or "/" in name or "\\" in name or name.startswith(".") or name in ("..",):
        raise CatomeError(f"engine name {name!r} must be a plain folder name (no slashes, not starting with '.')")
    out = Path(out_dir) if out_dir is not None else Path("engines") / name
    return BuildOptions(model=model, weights=weights, precision=precision, backend=backend, resolution=(lo, hi),
                        batch=(blo, bhi), settings=settings or MergeSettings(max_downsample=info.max_downsample), name=name, out_dir=out,
                        verify=bool(verify), verify_steps=verify_steps, exporter=exporter, opset=opset,
                        default_resolution=default, opt_merge_fraction=opt_merge_fraction, cli=dict(cli or {}),
                        ort_optimize=ort_optimize)


# -- folder handling ----------------------------------------------------------------------------------------
def _recover_leftovers(target: Path) -> None:
    """Put back an old build a crashed swap left aside; remove temp folders of dead builds."""
    parent = target.parent
    for path in sorted(parent.glob(f".{target.name}.old-*")):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and pid_alive(int(pid)) and int(pid) != os.getpid():
            continue
        if not target.exists() and (path / MANIFEST_FILE).is_file():
            logger.info("restoring the previous build from %s (a build was interrupted while swapping)", path)
            os.rename(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)
    for path in parent.glob(f".{target.name}.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
            shutil.rmtree(path, ignore_errors=True)


def _check_target(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise CatomeError(f"{target} exists and is not a folder: choose another --out")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST_FILE).is_file():
        raise CatomeError(f"{target} exists and is not an engine folder (no {MANIFEST_FILE}): choose another --out, "
                          "or remove it")


BUILD_FILES = (MANIFEST_FILE, "timing.cache")
"""Files a build writes into the folder besides those its manifest lists."""
_BUILD_NAME = re.compile(r"^stage_\d+\.(onnx|plan|ort\.onnx)([._-][\w.-]*)?$")
"""Names a build gives its stage files (graphs, external data, TensorRT plans), for a manifest it cannot read."""


def foreign_files(target: Path) -> list[str]:
    """Files in an existing engine folder that no build made: neither listed by its manifest nor written by a
    build beside them (paths relative to the folder, sorted). A rebuild would replace the folder with them."""
    if not target.is_dir():
        return []
    ours = set(BUILD_FILES)
    try:
        data = json.loads((target / MANIFEST_FILE).read_text(encoding="utf-8"))
        for entry in data.get("stages") or []:
            engine = entry.get("engine") if isinstance(entry, dict) else None
            names = (entry.get("file"), entry.get("external_data"), engine.get("file") if isinstance(engine, dict)
                     else None) if isinstance(entry, dict) else ()
            ours.update(n for n in names if isinstance(n, str))
            fused = entry.get("ort_optimized") if isinstance(entry, dict) else None
            if isinstance(fused, dict):  # ONNX Runtime's fused graph and its weights
                ours.update(n for n in (fused.get("file"), fused.get("external_data")) if isinstance(n, str))
    except (OSError, ValueError, AttributeError, TypeError):
        data = None
    found = []
    for path in sorted(target.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        rel = path.relative_to(target).as_posix()
        if rel in ours or (data is None and _BUILD_NAME.match(rel)):
            continue
        found.append(rel)
    return found


def _check_foreign(target: Path, force: bool) -> None:
    """CatomeError naming the files of someone else's in the engine folder, unless ``force``."""
    found = foreign_files(target)
    if not found:
        return
    shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    if force:
        logger.warning("--force: the rebuild of %s removes files no build made: %s", target, shown)
        return
    raise CatomeError(f"{target} holds files no build made ({shown}); a rebuild replaces the whole folder: move "
                      "them out, build into another --out, or pass --force to remove them")


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished build in; the old one goes aside first and is deleted after.

    A file-system error on the way (permissions, a folder held open elsewhere) ends in
    :class:`CatomeError` with the old build back in place.
    """
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(target, old)
        except OSError as exc:
            raise CatomeError(f"cannot move the old build {target} aside to install the new one "
                              f"({exc.strerror or exc}): check the permissions of {target.parent} and that no "
                              f"program holds {target} open; {target} was not changed") from None
    try:
        os.rename(tmp, target)
    except BaseException as exc:
        restored = old is None
        if old is not None:
            try:
                os.rename(old, target)
                restored = True
            except OSError:
                pass
        if not isinstance(exc, OSError):
            raise
        where = f"{target} was not changed" if restored else f"the previous build is in {old}: rename it back"
        raise CatomeError(f"cannot move the finished build into {target} ({exc.strerror or exc}): check the "
                          f"permissions of {target.parent}; {where}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _keep_unplaced(tmp: Path, target: Path) -> Path:
    """A finished build that could not be swapped in: renamed to ``<target>.new`` (which no later build
    cleans up), or left where it is when even that fails."""
    kept = target.parent / f"{target.name}.new"
    if kept.exists():
        return tmp
    try:
        os.rename(tmp, kept)
    except OSError:
        return tmp
    return kept


# -- the build ----------------------------------------------------------------------------------------------
def _resolve_backend(requested: str) -> str:
    from catome_export.backends.select import choose_backend

    if requested == "trt":
        choose_backend("trt")  # CatomeError naming TensorRT and how to install it when it cannot run here
        return "trt"
    if requested == "auto":
        try:
            return "trt" if choose_backend("auto").name == "trt" else "ort"
        except CatomeError:
            return "ort"  # no runtime backend at all: the graphs can still be built
    return "ort"


def _opt_latent(opts: BuildOptions) -> int:
    lo, hi = opts.resolution
    return min(max(opts.default_resolution, lo), hi) // 8


def _calibrate_schedule(opts: BuildOptions, unet: torch.nn.Module, spec: str, progress: Progress) -> MergeSettings:
    from catome_export.analysis.calibrate import resolve_schedule

    s = opts.settings
    progress(f"calibrating schedule {spec} on the model")
    schedule = resolve_schedule(spec, unet, s.schedule.step_base, threshold=s.threshold, ratio=s.ratio,
                                latent_hw=(_opt_latent(opts),) * 2, max_downsample=s.max_downsample,
                                stride=s.stride)
    return replace(s, schedule=schedule)


def run_build(opts: BuildOptions, progress: Progress | None = None, schedule_spec: str | None = None, *,
              force: bool = False) -> BuildResult:
    """Build the engine folder ``opts.out_dir`` (see the module docstring for the steps and atomicity).

    An existing folder is replaced only when every file in it was made by a build (its manifest lists them);
    other files are refused before any work starts, unless ``force`` (then they are removed with the old build).
    """
    say = progress or logger.info
    start = time.perf_counter()
    backend = _resolve_backend(opts.backend)
    target = opts.out_dir
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CatomeError(f"cannot create the folder {target.parent} for --out {target} ({exc.strerror or exc}): "
                          "choose an --out in a writable folder") from None
    with BuildLock(target.parent / f".{target.name}.lock", str(target)):
        _recover_leftovers(target)
        _check_target(target)
        _check_foreign(target, force)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        keep_tmp = False  # True once tmp is the installed build, or a failed one kept for inspection
        try:
            try:
                tmp.mkdir()
                result = _build_into(opts, tmp, backend, say, schedule_spec)
            except OSError as exc:
                raise CatomeError(f"the build failed on a file operation ({exc}): check the free space and "
                                  f"permissions of {target.parent}; {target} was not changed") from exc
            if result.verify is not None and not getattr(result.verify, "ok", True):
                failed = target.parent / f".{target.name}.failed"
                shutil.rmtree(failed, ignore_errors=True)
                try:
                    os.rename(tmp, failed)
                except OSError:
                    failed = tmp
                    keep_tmp = True
                summary = getattr(result.verify, "summary", lambda: "")()
                raise CatomeError(f"the engine does not match eager CA-ToMe ({summary.splitlines()[0] if summary else ''})"
                                  f"; it was not installed: {target} is unchanged, the failed build is in {failed} "
                                  f"(inspect it with catome-export verify {failed})")
            if not force:
                _check_foreign(target, False)  # put there while this build ran
            try:
                _swap_into_place(tmp, target)
            except CatomeError as exc:  # the finished build is kept, and the message says where
                keep_tmp = True
                kept = _keep_unplaced(tmp, target)
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


def _build_into(opts: BuildOptions, folder: Path, backend: str, say: Progress,
                schedule_spec: str | None) -> BuildResult:
    from catome_export.export.stages import cut_unet
    from catome_export.models import find_merge_sites, load_unet, model_info

    notes: list[str] = []
    dtype = precision_dtype(opts.precision)
    say(f"loading {opts.model} ({opts.weights} weights, {opts.precision})")
    unet = load_unet(opts.model, weights=opts.weights, dtype=dtype)
    settings = opts.settings
    if schedule_spec is not None:
        settings = _calibrate_schedule(replace(opts, settings=settings), unet, schedule_spec, say)
    sites = find_merge_sites(unet, settings.max_downsample)
    stages = cut_unet(unet, sites, dtype, merge_crossattn=settings.merge_crossattn, merge_mlp=settings.merge_mlp)
    examples = example_inputs(stages, sites, unet.config, dtype, stride=settings.stride)
    check_ort = opts.verify and opts.precision == "fp32"
    if opts.verify and not check_ort:
        notes.append("per-stage ONNX Runtime check skipped: ONNX Runtime's CPU kernels lack fp16 ScatterElements "
                     "(add); fp16 graphs run on TensorRT or ONNX Runtime CUDA")
    quick: dict[int, float] | None = {} if check_ort else None
    exported: list[ExportedStage] = []
    fused: dict[int, OptimizedGraph] = {}
    fuse = backend == "ort" and opts.ort_optimize
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
        if backend == "trt":
            raise CatomeError(f"the stage graphs use ops TensorRT cannot parse ({len(audit.errors)} errors, first: "
                              f"{audit.errors[0]}); build with --backend ort, or report the model layout")
        notes.append("the graphs would not parse in TensorRT (see the audit); ONNX Runtime can still run them")
    info = model_info(opts.model)
    manifest = _make_manifest(opts, unet, sites, stages, exported, settings, backend, audit, info)
    for entry in manifest.stages:
        if entry["index"] in fused:
            entry["ort_optimized"] = fused[entry["index"]].entry()
    del unet, stages, examples
    if backend == "trt":
        _build_trt(folder, manifest, opts, say)
    manifest.save(folder)  # LAST: a folder without a manifest is never loaded
    report = None
    if opts.verify:
        report = _verify(folder, opts, backend, notes, say)
    return BuildResult(manifest=manifest, engine_dir=folder, stages=exported, audit=audit, quick_check=quick,
                       verify=report, backend=backend, seconds=0.0, notes=notes)


def _describe_fused(graph: OptimizedGraph) -> str:
    ops = ", ".join(f"{count} {op}" for op, count in graph.fused.items()) or "no fused operators"
    left = f", {graph.attention_left} attention(s) left unfused" if graph.attention_left else ""
    return f"{ops}{left}, {graph.seconds:.1f} s"


def _describe(spec) -> str:
    parts = []
    if spec.site is not None:
        parts.append(f"site {spec.site}")
    parts.append(f"-> {site_input_name(spec.next_site)}" if spec.next_site is not None else f"-> {MODEL_OUTPUT}")
    return ", ".join(parts)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _opt_fraction(opts: BuildOptions, settings: MergeSettings) -> float:
    if opts.opt_merge_fraction is not None:
        return float(opts.opt_merge_fraction)
    return settings.merge_fraction if settings.merge_fraction is not None else 0.5


def _make_manifest(opts: BuildOptions, unet, sites, stages, exported, settings: MergeSettings, backend: str,
                   audit: AuditReport, info) -> Manifest:
    import json

    from catome_export.models import weights_hash

    channels = {}
    for spec, _ in stages:
        for t in spec.outputs:
            site = site_of_input(t.name)
            if site is not None:
                channels[site] = int(t.shape[-1])
    lo, hi = opts.resolution
    config = json.loads(json.dumps(dict(unet.config), default=lambda o: list(o) if isinstance(o, tuple) else str(o)))
    opt_latent = _opt_latent(opts)
    shapes = {
        "batch": list(opts.batch), "latent_height": [lo // 8, hi // 8], "latent_width": [lo // 8, hi // 8],
        "text_len": info.text_len, "text_dim": int(unet.config.cross_attention_dim),
        "opt": {"batch": opts.batch[1], "latent_height": opt_latent, "latent_width": opt_latent,
                "merge_fraction": _opt_fraction(opts, settings)},
    }
    cli = {"model": opts.model, "weights": opts.weights, "precision": opts.precision, "backend": opts.backend,
           "name": opts.name, "out": str(opts.out_dir)}
    cli.update({k: v for k, v in opts.cli.items() if v is not None})
    if not opts.ort_optimize:
        cli["ort_optimize"] = "off"
    if lo == hi and "min_resolution" not in cli:
        cli["resolution"] = lo
    else:
        cli.update(min_resolution=lo, max_resolution=hi)
    if opts.batch[0] == opts.batch[1] and "min_batch" not in cli:
        cli["batch"] = opts.batch[0]
    else:
        cli.update(min_batch=opts.batch[0], max_batch=opts.batch[1])
    return Manifest(
        name=opts.name,
        model={"id": opts.model, "weights": opts.weights, "weights_hash": weights_hash(unet), "unet_config": config},
        precision=opts.precision, merge=settings.to_dict(),
        sites=[{"index": s.index, "path": s.path, "downsample": s.downsample, "channels": channels.get(s.index)}
               for s in sites],
        shapes=shapes, stages=[e.entry(spec) for e, (spec, _) in zip(exported, stages)],
        engine_backend="ort", trt=None, tools=tool_versions(),
        extra={"build": cli, "build_command": build_command(cli), "audit": audit.to_dict(),
               "export": {"exporter": opts.exporter, "opset": opts.opset,
                          "ort_optimize": backend == "ort" and opts.ort_optimize}},
    )


def _build_trt(folder: Path, manifest: Manifest, opts: BuildOptions, say: Progress) -> None:
    """TensorRT engines for every stage (catome_export.export.trt_build), recorded in the manifest."""
    try:
        from catome_export.export.trt_build import build_engines
    except ImportError as exc:  # pragma: no cover - the module ships with the package
        raise CatomeError(f"the TensorRT builder is unavailable ({exc}): build with --backend ort") from None
    manifest.engine_dir = folder
    section = build_engines(folder, manifest, fp16=opts.precision == "fp16",
                            progress=lambda k, n, msg: say(f"  stage {k + 1}/{n}: {msg}"))
    engines = {int(e["index"]): {"file": e["file"], "sha256": e["sha256"], "bytes": e["bytes"]}
               for e in section.get("engines", [])}
    for entry in manifest.stages:
        if entry["index"] not in engines:
            raise CatomeError(f"TensorRT built no engine for stage {entry['index']}: rebuild with --backend trt")
        entry["engine"] = engines[entry["index"]]
    manifest.trt = {k: v for k, v in section.items() if k != "engines"}
    manifest.engine_backend = "trt"
    manifest.tools = tool_versions()


def _verify(folder: Path, opts: BuildOptions, backend: str, notes: list[str], say: Progress) -> Any | None:
    """The runtime's step-by-step parity check against eager CA-ToMe (skipped where it cannot run)."""
    try:
        from catome_export.runtime.verify import verify_engine
    except ImportError as exc:
        notes.append(f"verification skipped: catome_export.runtime.verify is unavailable ({exc})")
        say(notes[-1])
        return None
    run_on = "trt" if backend == "trt" else "ort"
    if run_on == "ort" and opts.precision == "fp16":
        from catome_export.backends.select import choose_backend

        try:
            if choose_backend("ort").name != "ort-cuda":
                notes.append("verification skipped: fp16 graphs do not run on ONNX Runtime CPU (no fp16 "
                             "ScatterElements add kernel); verify on a GPU with catome-export verify")
                say(notes[-1])
                return None
        except CatomeError as exc:
            notes.append(f"verification skipped: {exc}")
            say(notes[-1])
            return None
    say(f"verifying against eager CA-ToMe ({opts.verify_steps} steps, backend {run_on})")
    report = verify_engine(folder, steps=opts.verify_steps, backend=run_on)
    differences = report.format_differences(limit=5)  # near-tie flips, and any plan difference that fails
    if differences:
        say(differences)
    say(report.summary())
    return report


def build_engine(model: str, weights: str | None = None, precision: str = "fp32", backend: str = "auto",
                 resolution: int | None = None, min_resolution: int | None = None,
                 max_resolution: int | None = None, batch: int | None = None, min_batch: int | None = None,
                 max_batch: int | None = None, settings: MergeSettings | None = None,
                 out_dir: str | Path | None = None, name: str | None = None, verify: bool = True,
                 progress: Progress | None = None, force: bool = False, **options: Any) -> Manifest:
    """Build an engine folder and return its manifest (see :func:`run_build` for the full result).

    ``options``: ``verify_steps``, ``exporter`` (``torchscript`` | ``dynamo``), ``opset``,
    ``opt_merge_fraction`` (the merge level TensorRT profiles tune for), ``ort_optimize`` (bool: ONNX Runtime's
    fused graphs beside the standard ones, default True), ``schedule``
    (a schedule spec, ``auto:K`` included, that replaces ``settings.schedule``). ``force``: remove files in
    an existing engine folder that no build made (otherwise the build refuses, naming them).
    """
    schedule = options.pop("schedule", None)
    allowed = {"verify_steps", "exporter", "opset", "opt_merge_fraction", "ort_optimize"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise CatomeError(f"unknown build option(s) {', '.join(unknown)}: use {', '.join(sorted(allowed))}, schedule")
    settings = settings or MergeSettings()
    spec = None
    if schedule is not None:
        from catome_export.merging.schedules import parse_schedule

        if isinstance(schedule, str) and schedule.strip().lower().startswith("auto:"):
            spec = schedule
        else:
            settings = replace(settings, schedule=parse_schedule(schedule, settings.schedule.step_base))
    opts = make_options(model, weights, precision, backend, resolution, min_resolution, max_resolution, batch,
                        min_batch, max_batch, settings, name, out_dir, verify, **options)
    return run_build(opts, progress, schedule_spec=spec, force=bool(force)).manifest
