"""Build TensorRT engines (``stage_<k>.plan``) from the stages' ONNX graphs, through Polygraphy.

One engine per stage, each with one optimisation profile from
:func:`catome_export.export.profiles.compute_profiles`. Every stage graph is
parsed as a strongly typed network (``NetworkFromOnnxPath(...,
strongly_typed=True)``): the tensor types of the ONNX export decide the
precision, so fp16 engines come from the fp16 export, the same way on
TensorRT 10.x and 11.x (11 has no FP16 builder flag; 10.12+ deprecates it).
The builder config sets the optimisation level and shares one persistent
timing cache across the stages and across builds (``timing.cache``): the
cache is created from the saved bytes and attached to the config directly
(``config.set_timing_cache(config.create_timing_cache(data), False)``), so no
``.lock`` file is left next to it, and saved after every stage with an
atomic replace. A stage that contains an op TensorRT runs as a plugin
(``ScatterElements`` with a reduction: the merge's scatter-add) gets the
plugin library registered first (``trt.init_libnvinfer_plugins``); every plan
is written atomically.

``tensorrt`` is imported only inside :func:`build_engines`; without it the
function raises :class:`CatomeError` naming TensorRT and how to install it.
With TensorRT 11 it refuses Polygraphy older than 0.50 up front (0.49.x reads
``ILayer.precision_is_set``, which 11 removed), and an AttributeError from
inside Polygraphy (another such API gap) becomes a CatomeError too.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from catome_export.checks import check_int
from catome_export.errors import CatomeError
from catome_export.tensorrt_support import (
    import_tensorrt, polygraphy_problem, polygraphy_version, require_polygraphy,
)
from catome_export.fsutil import atomic_write_bytes, sha256_file
from catome_export.engine.manifest import EngineFile, Manifest, TrtRecord
from catome_export.export.profiles import (
    DEFAULT_OPT_MERGE_FRACTION, StageProfile, compute_profiles, profiles_to_json,
)

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
"""``progress(stage_index, num_stages, message)``."""

PLUGIN_LIBRARY = "libnvinfer_plugin"

_REDUCING_SCATTERS = ("ScatterElements", "ScatterND")


def plan_file(index: int) -> str:
    """File name of stage ``index``'s TensorRT engine."""
    return f"stage_{index}.plan"


def scan_onnx_ops(onnx_path: Path) -> dict[str, Any]:
    """Ops of one stage graph that matter to the TensorRT build (the weights are not loaded).

    Returns ``{"plugins": [...], "instance_norm": bool, "custom_domains": [...]}``:
    ``plugins`` names the ops the ONNX parser maps to a ``libnvinfer_plugin``
    plugin (ScatterElements / ScatterND with a reduction other than none).
    """
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:
        raise CatomeError(f"cannot read {onnx_path} ({type(exc).__name__}: {exc}): the ONNX graph is damaged, "
                          "rebuild the engine folder (catome-export build ...)") from None
    plugins: set[str] = set()
    domains: set[str] = set()
    instance_norm = False

    def visit(graph: Any) -> None:
        nonlocal instance_norm
        for node in graph.node:
            if node.domain not in ("", "ai.onnx"):
                domains.add(node.domain)
            if node.op_type == "InstanceNormalization":
                instance_norm = True
            if node.op_type in _REDUCING_SCATTERS:
                attrs = {a.name: a for a in node.attribute}
                reduction = attrs["reduction"].s.decode() if "reduction" in attrs else "none"
                if reduction != "none":
                    plugins.add(f"{node.op_type}(reduction={reduction})")
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    visit(a.g)
                for g in a.graphs:
                    visit(g)

    visit(model.graph)
    for fn in model.functions:
        for node in fn.node:
            if node.op_type in _REDUCING_SCATTERS:
                plugins.add(f"{node.op_type}(reduction=?)")
    return {"plugins": sorted(plugins), "instance_norm": instance_norm, "custom_domains": sorted(domains)}


def _import_tensorrt() -> Any:
    return import_tensorrt()  # CatomeError naming TensorRT and the install command


def shared_timing_cache(trt_version: str, gpu_name: str, compute_capability: str) -> Path | None:
    """The per-user timing cache for this TensorRT version and GPU, shared by every build on the machine.

    ``$CATOME_EXPORT_CACHE`` (else ``$XDG_CACHE_HOME/catome-export``, else
    ``~/.cache/catome-export``) ``/trt-timing/trt<version>-sm<cc>-<gpu>.cache``;
    None when no home folder is known. Builds run in a temporary folder, so
    this copy is what carries tactic timings from one build to the next.
    """
    base = os.environ.get("CATOME_EXPORT_CACHE")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        try:
            base = str(Path(xdg) / "catome-export") if xdg else str(Path.home() / ".cache" / "catome-export")
        except RuntimeError:  # no home folder
            return None
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower() or "gpu"
    return Path(base) / "trt-timing" / f"trt{trt_version}-sm{compute_capability.replace('.', '')}-{gpu}.cache"


def gpu_info() -> tuple[str, str]:
    """(name, "major.minor" compute capability) of the current CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise CatomeError("TensorRT needs a CUDA device and a CUDA build of torch; build with --engine-kind ort on "
                          "this machine")
    index = torch.cuda.current_device()
    return torch.cuda.get_device_name(index), ".".join(str(v) for v in torch.cuda.get_device_capability(index))


@dataclass(frozen=True)
class TrtBuild:
    """What :func:`build_engines` made: the manifest's ``trt`` record and one plan per stage, in stage order."""

    record: TrtRecord
    engines: tuple[EngineFile, ...]

    def apply(self, manifest: Manifest) -> None:
        """Record the plans in ``manifest`` (its ``trt`` section, every stage's engine, ``engine_backend`` trt)."""
        if len(self.engines) != len(manifest.stages):
            raise CatomeError(f"TensorRT built {len(self.engines)} engines for {len(manifest.stages)} stages: "
                              "rebuild with --engine-kind trt")
        manifest.stages = tuple(replace(s, engine=e) for s, e in zip(manifest.stages, self.engines))
        manifest.trt = self.record
        manifest.engine_backend = "trt"


def build_engines(
    engine_dir: str | Path,
    manifest: Manifest,
    *,
    fp16: bool,
    builder_optimization_level: int = 3,
    opt_merge_fraction: float | None = None,
    timing_cache: str | Path | None = None,
    progress: Progress | None = None,
    refittable: bool = False,
) -> TrtBuild:
    """Build ``stage_<k>.plan`` for every stage of ``manifest`` in ``engine_dir``; return the ``trt`` section.

    ``fp16``: build fp16 engines; they come from the fp16 export (the
    manifest's precision must be fp16), parsed strongly typed. Engines of
    fp16 graphs are fp16 whatever this says.
    ``builder_optimization_level``: 0-5, TensorRT's default is 3; higher
    searches longer for faster tactics. ``opt_merge_fraction``: the merge
    level the profiles are tuned for (see ``compute_profiles``).
    ``timing_cache``: the tactic timing cache written after every stage, by
    default ``engine_dir/timing.cache``; when it does not exist yet the
    build starts from the per-user cache of this TensorRT and GPU
    (:func:`shared_timing_cache`), which is updated at the end.
    ``progress(k, n, message)`` is called before and after each stage.
    ``refittable``: plans whose weights a Refitter can replace (BuilderFlag.REFIT; with STRIP_PLAN too where
    this TensorRT has it, so the plans carry no weights and every load refits them from the graphs).

    The result holds the ``trt`` record (TensorRT version, GPU name, compute
    capability, plugins, profiles, build flags) and one :class:`EngineFile`
    per stage; :meth:`TrtBuild.apply` puts both into a manifest.
    """
    engine_dir = Path(engine_dir)
    check_int("builder optimisation level", builder_optimization_level, 0, 5)
    trt = _import_tensorrt()
    require_polygraphy("build with --engine-kind ort")
    _check_polygraphy(str(trt.__version__))
    from polygraphy.backend.trt import CreateConfig, NetworkFromOnnxPath, Profile, engine_bytes_from_network
    from polygraphy.backend.trt import util as trt_util
    from polygraphy.exception import PolygraphyException

    entries = manifest.stages
    if not entries:
        raise CatomeError("the manifest lists no stages: rebuild the engine folder (catome-export build ...)")
    profiles = compute_profiles(manifest, None, opt_merge_fraction)
    cache_path = Path(timing_cache) if timing_cache is not None else engine_dir / "timing.cache"
    name, cc = gpu_info()
    shared = shared_timing_cache(str(trt.__version__), name, cc)
    seed = cache_path if cache_path.is_file() else shared if shared is not None and shared.is_file() else None
    precision = manifest.precision
    if fp16 and precision != "fp16":
        raise CatomeError("fp16 TensorRT engines are built from the fp16 ONNX export (TensorRT 11 has no fp16 "
                          "builder flag): export the stages in fp16 (catome-export build ... --precision fp16 "
                          "--engine-kind trt)")
    use_fp16 = precision == "fp16"
    strip = refittable and strip_plan_supported(trt)
    trt_logger = trt_util.get_trt_logger()
    plugins_loaded = False
    all_plugins: set[str] = set()
    engines: list[EngineFile] = []
    for entry, profile in zip(entries, profiles):
        index = entry.index
        onnx_path = engine_dir / entry.file
        if not onnx_path.is_file():
            raise CatomeError(f"{onnx_path} is missing: export the stages first (catome-export build ...)")
        ops = scan_onnx_ops(onnx_path)
        if ops["custom_domains"]:
            raise CatomeError(f"stage {index} uses ops of custom domains {ops['custom_domains']}, which the TensorRT "
                              "ONNX parser cannot import: re-export the stages")
        if ops["plugins"] and not plugins_loaded:
            if not trt.init_libnvinfer_plugins(trt_logger, ""):
                raise CatomeError(f"TensorRT could not load its plugin library ({PLUGIN_LIBRARY}), needed for "
                                  f"{', '.join(ops['plugins'])}: reinstall TensorRT (pip install 'catome-export[trt]')")
            plugins_loaded = True
        all_plugins.update(ops["plugins"])
        if progress:
            progress(index, len(entries), f"building {plan_file(index)}")
        source = cache_path if cache_path.is_file() else seed
        data = _build_one(trt, onnx_path, index, profile, builder_optimization_level, source, cache_path,
                          CreateConfig, NetworkFromOnnxPath, Profile, engine_bytes_from_network,
                          PolygraphyException, refit=(refittable, strip))
        plan_path = engine_dir / plan_file(index)
        atomic_write_bytes(plan_path, data)
        engines.append(EngineFile(plan_path.name, sha256_file(plan_path), plan_path.stat().st_size))
        logger.info("stage %d: %s (%.1f MB)", index, plan_path.name, plan_path.stat().st_size / 1e6)
        if progress:
            progress(index, len(entries), f"built {plan_path.name}")
    if shared is not None and cache_path.is_file():
        try:
            shared.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(shared, cache_path.read_bytes())
        except OSError as exc:  # the shared copy only speeds up later builds
            logger.debug("could not update the shared timing cache %s: %s", shared, exc)
    record = TrtRecord(
        version=str(trt.__version__),
        gpu=name,
        compute_capability=cc,
        plugins=tuple(sorted(all_plugins)),
        plugin_library=PLUGIN_LIBRARY if all_plugins else None,
        profiles=tuple(profiles_to_json(profiles)),
        opt_merge_fraction=_opt_fraction(manifest, opt_merge_fraction),
        fp16=use_fp16,
        strongly_typed=True,
        builder_optimization_level=builder_optimization_level,
        version_compatible=False,
        hardware_compatibility_level="none",
        timing_cache=cache_path.name if cache_path.parent == engine_dir else str(cache_path),
        extra={"refittable": refittable, "strip_plan": strip} if refittable else {},
    )
    return TrtBuild(record, tuple(engines))


def strip_plan_supported(trt: Any) -> bool:
    """Whether this TensorRT can build weight-stripped plans (``BuilderFlag.STRIP_PLAN``, 10.0 and later)."""
    return hasattr(getattr(trt, "BuilderFlag", None), "STRIP_PLAN") and hasattr(trt, "OnnxParserRefitter")


def _check_polygraphy(trt_version: str) -> None:
    """CatomeError naming the upgrade unless the installed Polygraphy can build with this TensorRT."""
    problem = polygraphy_problem(trt_version, polygraphy_version())
    if problem is not None:
        raise CatomeError(problem)


def _opt_fraction(manifest: Manifest, given: float | None) -> float:
    if given is not None:
        return float(given)
    frac = manifest.shapes.opt_merge_fraction
    return DEFAULT_OPT_MERGE_FRACTION if frac is None else frac


def _build_one(trt: Any, onnx_path: Path, index: int, profile: StageProfile, level: int, source: Path | None,
               cache_path: Path,
               CreateConfig: Any, NetworkFromOnnxPath: Any, Profile: Any, engine_bytes_from_network: Any,
               PolygraphyException: type, refit: tuple[bool, bool] = (False, False)) -> bytes:
    """Parse (strongly typed), configure and build one stage, the timing cache seeded from ``source``; save the
    grown cache atomically."""
    poly_profile = Profile()
    for name, (mn, opt, mx) in profile.items():
        poly_profile.add(name, min=list(mn), opt=list(opt), max=list(mx))
    version = str(trt.__version__)
    try:
        # NATIVE_INSTANCENORM: TensorRT's own InstanceNormalization layer rather than the plugin
        # (the parser's default; listed because setting flags replaces the defaults).
        builder, network, parser = NetworkFromOnnxPath(
            str(onnx_path), flags=[trt.OnnxParserFlag.NATIVE_INSTANCENORM], strongly_typed=True)()
        extra = {"refittable": True, "strip_plan": refit[1]} if refit[0] else {}
        config = CreateConfig(profiles=[poly_profile], builder_optimization_level=level, **extra)(builder, network)
        _attach_timing_cache(config, source)
        engine = engine_bytes_from_network((builder, network, parser), config=config)
    except PolygraphyException as exc:
        raise CatomeError(f"TensorRT {version} could not build stage {index} ({onnx_path.name}): {exc}. See the "
                          "TensorRT messages above; check that the graph passes 'catome-export verify' with ONNX "
                          "Runtime") from None
    except AttributeError as exc:  # a TensorRT binding the installed Polygraphy expects is missing
        raise CatomeError(f"TensorRT {version} could not build stage {index} ({onnx_path.name}): Polygraphy "
                          f"{polygraphy_version()} uses a TensorRT API this TensorRT lacks ({exc}): install a "
                          "Polygraphy that supports it (pip install -U polygraphy; TensorRT 11 needs polygraphy>=0.50)"
                          ) from None
    if engine is None:
        raise CatomeError(f"TensorRT {version} returned no engine for stage {index} ({onnx_path.name}): see the "
                          "TensorRT messages above")
    try:
        cache = config.get_timing_cache()
        if cache is None:
            logger.warning("no timing cache was attached for stage %d; %s is not updated", index, cache_path)
        else:
            atomic_write_bytes(cache_path, bytes(memoryview(cache.serialize())))
    except Exception as exc:  # a cache is an optimisation: never fail a build for it
        logger.warning("could not save the timing cache %s: %s", cache_path, exc)
    return bytes(memoryview(engine))


def _attach_timing_cache(config: Any, source: Path | None) -> None:
    """Attach the timing cache saved at ``source`` to ``config`` (a new, empty one when there is none or it cannot
    be used: damaged, or made by another TensorRT version or GPU). Read from bytes: no lock file is created."""
    if source is None:
        return  # CreateConfig attached an empty cache already
    try:
        data = source.read_bytes()
    except OSError as exc:
        logger.warning("could not read the timing cache %s (%s): starting a new one", source, exc)
        return
    cache = config.create_timing_cache(data) if data else None
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return
    logger.warning("the timing cache %s cannot be used here (damaged, or made by another TensorRT version or GPU): "
                   "starting a new one, which replaces it", source)
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
