"""The engine folder's ``manifest.json``: what was built, from what, for which shapes, and how to rebuild it.

Written last by a build (atomically), read first by every load. ``load``
checks the format version, the manifest's own hash (``manifest_sha256`` =
sha256 of the canonical JSON of every other key: ``sort_keys=True``,
separators ``(",", ":")``), the presence, size and sha256 of every stage
file, and that the specs and merge settings parse; any problem is a
:class:`~catome_export.engine.record.RebuildNeeded` carrying the options to
build the folder again with (the CLI prints them as the ``catome-export
build`` command).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from catome_export._version import __version__
from catome_export.choices import EngineBackend, Precision
from catome_export.errors import CatomeError
from catome_export.fsutil import atomic_write_text, sha256_file
from catome_export.engine.controlnet import ControlNetRecord
from catome_export.engine.record import BuildRecord, RebuildNeeded
from catome_export.engine.shapes import ShapeRanges
from catome_export.engine.specs import CachedBranch, StageSpec
from catome_export.featurecache import FeatureCacheSettings
from catome_export.merging.schedules import Schedule
from catome_export.merging.settings import MergeSettings
from catome_export.models.registry import MODELS
from catome_export.models.sites import MergeSite

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CORE_KEYS = ("format_version", "catome_export_version", "name", "model", "precision", "merge", "sites", "shapes",
             "stages", "engine_backend", "trt", "tools", "created")
"""Keys every manifest has, in file order (``manifest_sha256`` comes last; other keys go in between)."""
PRECISIONS = Precision.values()
ENGINE_BACKENDS = EngineBackend.values()


def tool_versions() -> dict[str, str | None]:
    """Versions of the packages a build depends on (None for one that is not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("torch", "diffusers", "onnx", "onnxruntime", "tensorrt"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    if versions["onnxruntime"] is None:
        try:
            versions["onnxruntime"] = metadata.version("onnxruntime-gpu")
        except metadata.PackageNotFoundError:
            pass
    return versions


def canonical_hash(data: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``data`` without its ``manifest_sha256`` key."""
    body = {k: v for k, v in data.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _generic_options(engine_dir: Path) -> BuildRecord:
    """The build options of a folder that records none: its name, and the model of that name where there is one."""
    name = engine_dir.name or "NAME"
    model = name if name in MODELS else "MODEL"  # engines/<registry name> is that model's default folder
    return BuildRecord(model=model, name=name, out=str(engine_dir))


# -- the typed parts -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRecord:
    """The manifest's ``model`` section: which model, which weights."""

    id: str
    """``tiny``, ``sd15`` or a local diffusers folder."""
    weights: str | None = None
    """``pretrained`` or ``random``."""
    weights_hash: str | None = None
    unet_config: dict[str, Any] = field(default_factory=dict)
    """The U-Net's diffusers config (JSON-ready)."""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "weights": self.weights, "weights_hash": self.weights_hash,
                "unet_config": self.unet_config}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelRecord":
        if not isinstance(data, Mapping) or not isinstance(data.get("id"), str):
            raise ValueError("the model section is malformed")
        config = data.get("unet_config") or {}
        if not isinstance(config, dict):
            raise ValueError("model.unet_config is not an object")
        return cls(id=data["id"], weights=data.get("weights"), weights_hash=data.get("weights_hash"),
                   unet_config=config)


@dataclass(frozen=True)
class EngineFile:
    """A stage's TensorRT plan (the ``engine`` of a stage record)."""

    file: str
    sha256: str | None = None
    bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "bytes": self.bytes}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EngineFile":
        return cls(file=str(data["file"]), sha256=data.get("sha256"),
                   bytes=None if data.get("bytes") is None else int(data["bytes"]))


@dataclass(frozen=True)
class FusedGraph:
    """A stage's ONNX Runtime fused graph (``stage_<k>.ort.onnx``, catome_export.export.ort_optimize)."""

    file: str
    sha256: str | None = None
    bytes: int | None = None
    external_data: str | None = None
    external_data_sha256: str | None = None
    external_data_bytes: int | None = None
    fused: dict[str, int] = field(default_factory=dict)
    """Contrib operator type -> count in the fused graph."""
    attention_left: int = 0
    """Softmax nodes left unfused."""

    @property
    def total_bytes(self) -> int:
        return (self.bytes or 0) + (self.external_data_bytes or 0)

    def files(self) -> list[tuple[str, int | None, str | None]]:
        out = [(self.file, self.bytes, self.sha256)]
        if self.external_data:
            out.append((self.external_data, self.external_data_bytes, self.external_data_sha256))
        return out

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": self.file, "external_data": self.external_data, "sha256": self.sha256,
                             "bytes": self.bytes, "fused": dict(self.fused), "attention_left": self.attention_left}
        if self.external_data is not None:
            d["external_data_sha256"] = self.external_data_sha256
            d["external_data_bytes"] = self.external_data_bytes
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FusedGraph":
        return cls(file=str(data["file"]), sha256=data.get("sha256"),
                   bytes=None if data.get("bytes") is None else int(data["bytes"]),
                   external_data=data.get("external_data") or None,
                   external_data_sha256=data.get("external_data_sha256"),
                   external_data_bytes=(None if data.get("external_data_bytes") is None
                                        else int(data["external_data_bytes"])),
                   fused={str(k): int(v) for k, v in (data.get("fused") or {}).items()},
                   attention_left=int(data.get("attention_left") or 0))


@dataclass(frozen=True)
class StageRecord:
    """One stage: its spec and the files that hold it."""

    spec: StageSpec
    file: str
    """Graph file name, ``stage_<k>.onnx``."""
    sha256: str | None = None
    bytes: int | None = None
    external_data: str | None = None
    """Weights file (``stage_<k>.onnx.data``), None when the weights are inside the graph file."""
    external_data_sha256: str | None = None
    external_data_bytes: int | None = None
    engine: EngineFile | None = None
    """The TensorRT plan (None in an ONNX Runtime build)."""
    ort_optimized: FusedGraph | None = None
    """ONNX Runtime's fused form of the graph (ONNX Runtime builds with --ort-optimize on)."""

    @property
    def index(self) -> int:
        return self.spec.index

    def files(self) -> list[tuple[str, int | None, str | None]]:
        """(file name, bytes, sha256) of every file of this stage."""
        out = [(self.file, self.bytes, self.sha256)]
        if self.external_data:
            out.append((self.external_data, self.external_data_bytes, self.external_data_sha256))
        if self.ort_optimized is not None:
            out.extend(self.ort_optimized.files())
        if self.engine is not None:
            out.append((self.engine.file, self.engine.bytes, self.engine.sha256))
        return out

    @property
    def total_bytes(self) -> int:
        return (self.bytes or 0) + (self.external_data_bytes or 0)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"index": self.spec.index, "file": self.file, "external_data": self.external_data,
                             "sha256": self.sha256, "bytes": self.bytes}
        if self.external_data is not None:
            d["external_data_sha256"] = self.external_data_sha256
            d["external_data_bytes"] = self.external_data_bytes
        spec = self.spec.to_dict()
        d.update({"site": spec["site"], "next_site": spec["next_site"], "inputs": spec["inputs"],
                  "outputs": spec["outputs"], "engine": None if self.engine is None else self.engine.to_dict()})
        if self.ort_optimized is not None:
            d["ort_optimized"] = self.ort_optimized.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StageRecord":
        engine = data.get("engine")
        if engine is not None and not isinstance(engine, Mapping):
            raise ValueError(f"stage {data.get('index')}: engine is not an object")
        fused = data.get("ort_optimized")
        if fused is not None and not isinstance(fused, Mapping):
            raise ValueError(f"stage {data.get('index')}: ort_optimized is not an object")
        return cls(spec=StageSpec.from_dict(dict(data)), file=str(data["file"]), sha256=data.get("sha256"),
                   bytes=None if data.get("bytes") is None else int(data["bytes"]),
                   external_data=data.get("external_data") or None,
                   external_data_sha256=data.get("external_data_sha256"),
                   external_data_bytes=(None if data.get("external_data_bytes") is None
                                        else int(data["external_data_bytes"])),
                   engine=None if engine is None else EngineFile.from_dict(engine),
                   ort_optimized=None if fused is None else FusedGraph.from_dict(fused))


def _site_to_dict(site: MergeSite) -> dict[str, Any]:
    return {"index": site.index, "path": site.path, "downsample": site.downsample, "channels": site.channels}


def _site_from_dict(data: Mapping[str, Any]) -> MergeSite:
    channels = data.get("channels")
    return MergeSite(int(data["index"]), str(data["path"]), int(data["downsample"]),
                     channels=None if channels is None else int(channels))


TRT_KEYS = ("version", "gpu", "compute_capability", "plugins", "plugin_library", "profiles", "opt_merge_fraction",
            "fp16", "strongly_typed", "builder_optimization_level", "version_compatible",
            "hardware_compatibility_level", "timing_cache")


@dataclass(frozen=True)
class TrtRecord:
    """The manifest's ``trt`` section: how and where the TensorRT plans were built."""

    version: str | None = None
    gpu: str | None = None
    compute_capability: str | None = None
    plugins: tuple[str, ...] = ()
    plugin_library: str | None = None
    profiles: tuple[dict[str, dict[str, list[int]]], ...] = ()
    """Per stage, input -> {"min", "opt", "max"} (``profiles_to_json``)."""
    opt_merge_fraction: float | None = None
    fp16: bool = False
    strongly_typed: bool = True
    builder_optimization_level: int | None = None
    version_compatible: bool = False
    hardware_compatibility_level: str = "none"
    timing_cache: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys this version does not know (kept for the round trip)."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"version": self.version, "gpu": self.gpu, "compute_capability": self.compute_capability,
                             "plugins": list(self.plugins), "plugin_library": self.plugin_library,
                             "profiles": list(self.profiles), "opt_merge_fraction": self.opt_merge_fraction,
                             "fp16": self.fp16, "strongly_typed": self.strongly_typed,
                             "builder_optimization_level": self.builder_optimization_level,
                             "version_compatible": self.version_compatible,
                             "hardware_compatibility_level": self.hardware_compatibility_level,
                             "timing_cache": self.timing_cache}
        d.update({k: v for k, v in self.extra.items() if k not in d})
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrtRecord":
        if not isinstance(data, Mapping):
            raise ValueError("the trt section is not an object")
        frac = data.get("opt_merge_fraction")
        level = data.get("builder_optimization_level")
        return cls(
            version=None if data.get("version") is None else str(data["version"]),
            gpu=None if data.get("gpu") is None else str(data["gpu"]),
            compute_capability=None if data.get("compute_capability") is None else str(data["compute_capability"]),
            plugins=tuple(str(p) for p in data.get("plugins") or ()), plugin_library=data.get("plugin_library"),
            profiles=tuple(data.get("profiles") or ()), opt_merge_fraction=None if frac is None else float(frac),
            fp16=bool(data.get("fp16", False)), strongly_typed=bool(data.get("strongly_typed", True)),
            builder_optimization_level=None if level is None else int(level),
            version_compatible=bool(data.get("version_compatible", False)),
            hardware_compatibility_level=str(data.get("hardware_compatibility_level") or "none"),
            timing_cache=data.get("timing_cache"),
            extra={k: v for k, v in data.items() if k not in TRT_KEYS},
        )


@dataclass(frozen=True)
class FeatureCacheRecord:
    """The feature-cache branches an engine was cut for (``feature_cache`` in the manifest; absent: none)."""

    branches: tuple[CachedBranch, ...]
    settings: FeatureCacheSettings | None = None
    """The caching a runtime uses unless told otherwise (the build's ``--feature-cache``); None: off."""

    def branch(self, branch: int) -> CachedBranch | None:
        return next((b for b in self.branches if b.branch == branch), None)

    @property
    def branch_ids(self) -> tuple[int, ...]:
        return tuple(b.branch for b in self.branches)

    def to_dict(self) -> dict[str, Any]:
        return {"branches": [b.to_dict() for b in self.branches],
                "settings": None if self.settings is None else self.settings.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FeatureCacheRecord":
        settings = data.get("settings")
        return cls(branches=tuple(CachedBranch.from_dict(b) for b in data["branches"]),
                   settings=None if settings is None else FeatureCacheSettings.from_dict(settings))


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA of an engine: where it came from, its copy in the engine folder, its sha256 and scale."""

    source: str
    """The file as given (``--lora``, ``set_lora``)."""
    sha256: str
    scale: float = 1.0
    file: str | None = None
    """Its copy in the engine folder (``lora_<sha256[:12]>.safetensors``; None where it is not kept)."""
    bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "scale": self.scale, "file": self.file,
                "bytes": self.bytes}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoraEntry":
        return cls(source=str(data["source"]), sha256=str(data["sha256"]), scale=float(data.get("scale", 1.0)),
                   file=data.get("file") or None, bytes=None if data.get("bytes") is None else int(data["bytes"]))


@dataclass(frozen=True)
class LoraRecord:
    """The manifest's ``lora`` section (absent in manifests from before LoRA support: no refit).

    ``active`` is what the engine computes: the graphs hold the weights of ``built_with`` (fused at build,
    with the untouched values of those weights in ``base``), and ``overrides`` holds every weight whose
    active value differs from the graphs' (written by a refit; TensorRT plans are refit in place).
    """

    active: tuple[LoraEntry, ...] = ()
    built_with: tuple[LoraEntry, ...] = ()
    weights_map: EngineFile | None = None
    """``lora_map.json``: U-Net weight -> initializers of the stage graphs (catome_export.lora.weights)."""
    base: EngineFile | None = None
    """The base values of the weights ``built_with`` changed (safetensors; None when built without a LoRA)."""
    overrides: EngineFile | None = None
    """Active values that differ from the graphs' (safetensors; None: the graphs' own)."""
    refittable: bool = False
    """TensorRT plans built refittable (``--refittable``)."""
    stripped: bool = False
    """TensorRT plans built without their weights (STRIP_PLAN): every load refits them from the graphs."""

    def files(self) -> list[tuple[str, int | None, str | None]]:
        out = [(f.file, f.bytes, f.sha256) for f in (self.weights_map, self.base, self.overrides) if f is not None]
        out.extend((e.file, e.bytes, e.sha256) for e in self.active if e.file)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"active": [e.to_dict() for e in self.active], "built_with": [e.to_dict() for e in self.built_with],
                "weights_map": None if self.weights_map is None else self.weights_map.to_dict(),
                "base": None if self.base is None else self.base.to_dict(),
                "overrides": None if self.overrides is None else self.overrides.to_dict(),
                "refittable": self.refittable, "stripped": self.stripped}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoraRecord":
        if not isinstance(data, Mapping):
            raise ValueError("the lora section is not an object")

        def file(key: str) -> EngineFile | None:
            value = data.get(key)
            return None if value is None else EngineFile.from_dict(value)

        return cls(active=tuple(LoraEntry.from_dict(e) for e in data.get("active") or ()),
                   built_with=tuple(LoraEntry.from_dict(e) for e in data.get("built_with") or ()),
                   weights_map=file("weights_map"), base=file("base"), overrides=file("overrides"),
                   refittable=bool(data.get("refittable", False)), stripped=bool(data.get("stripped", False)))

    def describe(self) -> str:
        """``none`` or ``a.safetensors:0.8 + b.safetensors:1``."""
        return " + ".join(f"{Path(e.source).name}:{e.scale:g}" for e in self.active) or "none"


@dataclass
class Manifest:
    """Contents of ``manifest.json``, parsed into typed parts (see docs/export.md for every key).

    The on-disk format is unchanged by parsing: ``to_dict`` writes back the
    JSON that ``from_dict`` read (format version :data:`FORMAT_VERSION`).
    """

    name: str
    model: ModelRecord
    precision: str
    """``fp32`` or ``fp16``."""
    merge: MergeSettings
    sites: tuple[MergeSite, ...]
    shapes: ShapeRanges
    stages: tuple[StageRecord, ...]
    engine_backend: str = "ort"
    """``ort`` (ONNX graphs only) or ``trt`` (every stage has a TensorRT plan)."""
    trt: TrtRecord | None = None
    tools: dict[str, str | None] = field(default_factory=tool_versions)
    created: str = ""
    format_version: int = FORMAT_VERSION
    catome_export_version: str = __version__
    feature_cache: FeatureCacheRecord | None = None
    """The feature-cache branches the stages were cut for (None: an engine without feature caching)."""
    lora: LoraRecord | None = None
    """The LoRA the engine computes and what a refit needs (None: a manifest from before LoRA support)."""
    controlnet: ControlNetRecord | None = None
    """The ControlNet residual inputs (``build --controlnet``; None: an engine without them)."""
    build: BuildRecord | None = None
    """The options the folder was built with (None: a manifest from before they were recorded)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other top-level keys (``audit``, ``export``; ``build_command`` in manifests written before the build
    section was typed)."""
    manifest_sha256: str = ""
    engine_dir: Path | None = field(default=None, compare=False)
    """Folder it was loaded from or saved to (not stored)."""

    # -- (de)serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format_version": self.format_version, "catome_export_version": self.catome_export_version,
            "name": self.name, "model": self.model.to_dict(), "precision": self.precision,
            "merge": self.merge.to_dict(), "sites": [_site_to_dict(s) for s in self.sites],
            "shapes": self.shapes.to_dict(), "stages": [s.to_dict() for s in self.stages],
            "engine_backend": self.engine_backend, "trt": None if self.trt is None else self.trt.to_dict(),
            "tools": self.tools, "created": self.created,
        }
        if self.feature_cache is not None:
            d["feature_cache"] = self.feature_cache.to_dict()
        if self.lora is not None:
            d["lora"] = self.lora.to_dict()
        if self.controlnet is not None:
            d["controlnet"] = self.controlnet.to_dict()
        if self.build is not None:
            d["build"] = self.build.to_dict()
        for key, value in self.extra.items():
            if key not in d and key != "manifest_sha256":
                d[key] = value
        d["manifest_sha256"] = canonical_hash(d)
        return d

    def save(self, engine_dir: str | Path) -> Path:
        """Write ``engine_dir/manifest.json`` atomically (stamping ``created`` and the hash)."""
        engine_dir = Path(engine_dir)
        if not self.created:
            self.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        data = self.to_dict()
        self.manifest_sha256 = data["manifest_sha256"]
        path = engine_dir / MANIFEST_FILE
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")
        self.engine_dir = engine_dir
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], engine_dir: Path | None = None) -> "Manifest":
        """Parse every section (KeyError, TypeError, ValueError or CatomeError on a malformed one)."""
        known = set(CORE_KEYS) | {"manifest_sha256", "feature_cache", "lora", "controlnet", "build"}
        stages = data["stages"]
        sites = data["sites"]
        if not isinstance(stages, list) or not isinstance(sites, list):
            raise TypeError("stages and sites must be lists")
        trt = data.get("trt")
        cache = data.get("feature_cache")
        lora = data.get("lora")
        controlnet = data.get("controlnet")
        build = data.get("build")
        return cls(
            name=str(data["name"]), model=ModelRecord.from_dict(data["model"]), precision=data["precision"],
            merge=MergeSettings.from_dict(data["merge"]), sites=tuple(_site_from_dict(s) for s in sites),
            shapes=ShapeRanges.from_dict(data["shapes"]), stages=tuple(StageRecord.from_dict(e) for e in stages),
            engine_backend=data["engine_backend"], trt=None if trt is None else TrtRecord.from_dict(trt),
            tools=dict(data.get("tools") or {}), created=data.get("created", ""),
            feature_cache=None if cache is None else FeatureCacheRecord.from_dict(cache),
            lora=None if lora is None else LoraRecord.from_dict(lora),
            controlnet=None if controlnet is None else ControlNetRecord.from_dict(controlnet),
            build=None if build is None else BuildRecord.from_dict(build),
            format_version=data["format_version"], catome_export_version=data.get("catome_export_version", ""),
            extra={k: v for k, v in data.items() if k not in known},
            manifest_sha256=data.get("manifest_sha256", ""), engine_dir=engine_dir,
        )

    @classmethod
    def load(cls, engine_dir: str | Path, check_files: bool = True, check_hashes: bool = True) -> "Manifest":
        """Read and validate ``engine_dir/manifest.json``; CatomeError (naming the rebuild command) on any problem.

        ``check_files``: every stage file exists with its recorded size;
        ``check_hashes``: and its sha256 matches (reads every file once).
        """
        engine_dir = Path(engine_dir)
        path = engine_dir / MANIFEST_FILE
        options, recorded = _generic_options(engine_dir), False

        def rebuild(problem: str, lead: str = ": rebuild with") -> RebuildNeeded:
            return RebuildNeeded(problem, options, engine_dir, lead=lead, recorded=recorded)

        if engine_dir.is_file():
            hint = f"pass its folder {engine_dir.parent}" if engine_dir.name == MANIFEST_FILE else \
                "pass the folder that catome-export build wrote"
            raise CatomeError(f"{engine_dir} is a file, not an engine folder: {hint}")
        if not engine_dir.is_dir():
            raise rebuild(f"engine folder {engine_dir} does not exist", ": build it with")
        if not path.is_file():
            raise rebuild(f"{engine_dir} has no {MANIFEST_FILE} (not a finished build)", ": build it with")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise rebuild(f"{path} is unreadable ({type(exc).__name__})") from None
        if not isinstance(data, dict):
            raise rebuild(f"{path} is not a manifest (not a JSON object)")
        found = _recorded_options(data)
        if found is not None:  # the options the folder was built with (a hint; the checks below still apply)
            options, recorded = found, True
        elif isinstance(data.get("model"), Mapping):  # no build options recorded: at least the model's
            options = _model_options(data, engine_dir)
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise rebuild(f"{path} has format_version {version!r}; this catome-export ({__version__}) reads "
                          f"version {FORMAT_VERSION}")
        missing = [k for k in (*CORE_KEYS, "manifest_sha256") if k not in data]
        if missing:
            raise rebuild(f"{path} lacks {', '.join(missing)}")
        if canonical_hash(data) != data["manifest_sha256"]:
            raise rebuild(f"{path} was modified or damaged (its manifest_sha256 does not match its contents)")
        what = _first_malformed(data)
        if what is not None:
            raise rebuild(f"engine {engine_dir}: {what}", ": rebuild it with")
        try:
            manifest = cls.from_dict(data, engine_dir)
        except (KeyError, TypeError, ValueError, CatomeError) as exc:
            raise rebuild(f"{path} is malformed ({exc})") from None
        manifest._validate()
        if check_files:
            manifest.check_files(check_hashes)
        return manifest

    # -- validation -----------------------------------------------------------------------
    def _fail(self, what: str) -> RebuildNeeded:
        return self.rebuild_needed(f"engine {self.engine_dir or self.name}: {what}")

    def rebuild_needed(self, problem: str, lead: str = ": rebuild it with", after: str = "",
                       engine_dir: Path | None = None, overrides: Mapping[str, Any] | None = None) -> RebuildNeeded:
        """The error for a folder that must be built again because of ``problem``: with :meth:`rebuild_options`,
        into ``engine_dir`` (default: the folder this manifest was loaded from), ``overrides`` changed."""
        return RebuildNeeded(problem, self.rebuild_options(), engine_dir or self.engine_dir, overrides, lead=lead,
                             after=after)

    def _validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise self._fail(f"unknown precision {self.precision!r}")
        if self.engine_backend not in ENGINE_BACKENDS:
            raise self._fail(f"unknown engine_backend {self.engine_backend!r}")
        if not self.stages:
            raise self._fail("the manifest lists no stages")
        if [s.index for s in self.stages] != list(range(len(self.stages))):
            raise self._fail("stage indices are not 0..K in order")
        if self.engine_backend == "trt" and not all(s.engine is not None for s in self.stages):
            raise self._fail("a TensorRT build lists a stage without an engine file")
        if self.feature_cache is not None:
            for b in self.feature_cache.branches:
                if not b.stages or any(not 0 <= i < len(self.stages) for i in b.stages):
                    raise self._fail(f"feature-cache branch {b.branch} lists stages outside 0..{len(self.stages) - 1}")
            default = self.feature_cache.settings
            if default is not None and self.feature_cache.branch(default.branch) is None:
                raise self._fail(f"the default feature cache uses branch {default.branch}, which the stages were "
                                 "not cut for")
        if self.controlnet is not None:
            problem = self.controlnet.problem(self.stage_specs())
            if problem is not None:
                raise self._fail(problem)

    def files(self) -> list[tuple[str, int | None, str | None]]:
        """(file name, bytes, sha256) of every artifact the manifest vouches for."""
        out = [f for stage in self.stages for f in stage.files()]
        return out + (self.lora.files() if self.lora is not None else [])

    def check_files(self, check_hashes: bool = True) -> None:
        """Every listed file exists with its recorded size (and sha256)."""
        folder = self.engine_dir or Path(".")
        for name, size, digest in self.files():
            path = folder / name
            if Path(name).name != name:
                raise self._fail(f"stage file name {name!r} points outside the engine folder")
            if not path.is_file():
                raise self._fail(f"{name} is missing")
            if size is not None and path.stat().st_size != int(size):
                raise self._fail(f"{name} has {path.stat().st_size} bytes, the manifest records {size} "
                                 "(truncated or replaced)")
            if check_hashes and digest and sha256_file(path) != digest:
                raise self._fail(f"{name} does not match its sha256 in the manifest (damaged or replaced)")

    # -- accessors ------------------------------------------------------------------------
    def stage_specs(self) -> list[StageSpec]:
        return [s.spec for s in self.stages]

    @property
    def dtype_name(self) -> str:
        """The stages' float dtype name (``float32`` or ``float16``)."""
        return "float16" if self.precision == "fp16" else "float32"

    def check_shapes(self, batch: int, latent_h: int, latent_w: int) -> None:
        """CatomeError unless (batch, latent size) lies inside the built ranges (naming them and the rebuild)."""
        r = self.shapes
        problems: list[str] = []
        overrides: dict[str, tuple[int, int]] = {}
        if not r.batch[0] <= batch <= r.batch[1]:
            problems.append(f"batch {batch} is outside the built range {r.batch[0]}..{r.batch[1]}")
            overrides["batch"] = (min(batch, r.batch[0]), max(batch, r.batch[1]))
        for key, (lo, hi), value in (("latent_height", r.latent_height, latent_h),
                                     ("latent_width", r.latent_width, latent_w)):
            if not lo <= value <= hi:
                problems.append(f"{key.replace('_', ' ')} {value} ({value * 8} px) is outside the built range "
                                f"{lo}..{hi} ({lo * 8}..{hi * 8} px)")
        if problems:
            lows = [r.latent_height[0], r.latent_width[0], latent_h, latent_w]
            highs = [r.latent_height[1], r.latent_width[1], latent_h, latent_w]
            if any("latent" in p for p in problems):
                overrides["resolution"] = (8 * min(lows), 8 * max(highs))
            raise self.rebuild_needed(f"engine {self.name}: {'; '.join(problems)}",
                                      ". Use a size inside the range, or rebuild for it:", overrides=overrides)

    def build_record(self) -> BuildRecord:
        """The options the folder was built with: the recorded ``build`` section, or, in a manifest from before
        it was recorded, the options rebuilt from its model, precision, merge settings, shape ranges and
        TensorRT section."""
        if self.build is not None:
            return self.build
        s, merge = self.shapes, self.merge
        frac = self.trt.opt_merge_fraction if self.trt is not None else None
        if frac is None:
            frac = s.opt_merge_fraction
        return BuildRecord(
            model=self.model.id or self.name, weights=self.model.weights, precision=self.precision,
            # the CLI takes square pixel sizes: cover both sides
            resolution=(8 * min(s.latent_height[0], s.latent_width[0]), 8 * max(s.latent_height[1], s.latent_width[1])),
            batch=s.batch, threshold=merge.threshold, ratio=merge.ratio, merge_fraction=merge.merge_fraction,
            schedule=schedule_flag(merge.schedule), step_base=merge.schedule.step_base,
            r_multiple=None if merge.r_multiple == 1 else merge.r_multiple, max_downsample=merge.max_downsample,
            opt_merge_fraction=None if frac is None else float(frac), name=self.name,
            out=str(self.engine_dir) if self.engine_dir is not None else f"engines/{self.name}",
            controlnet=self.controlnet is not None)

    def rebuild_options(self) -> BuildRecord:
        """The options that build this folder again as it computes now: those it was built with
        (:meth:`build_record`), with the LoRAs a refit made active in place of the build's."""
        record = self.build_record()
        if self.lora is not None:
            record = replace(record, lora=tuple(f"{e.source}:{e.scale:g}" for e in self.lora.active))
        return record


def schedule_flag(schedule: Schedule) -> str:
    """A schedule as ``--schedule`` takes it: its name, or its checkpoint steps for a custom one."""
    if schedule.name == "custom" and schedule.checkpoints is not None:
        return ",".join(str(c) for c in schedule.checkpoints)
    return schedule.name


def _recorded_options(data: Mapping[str, Any]) -> BuildRecord | None:
    """The build options a manifest dict records (None: none, or a section that does not parse)."""
    recorded = data.get("build")
    if isinstance(recorded, Mapping):
        try:
            return BuildRecord.from_dict(recorded)
        except (KeyError, TypeError, ValueError):
            return None
    return None


def _model_options(data: Mapping[str, Any], engine_dir: Path) -> BuildRecord:
    """The build options of a manifest dict that records none: its model, weights, precision and name."""
    model = data.get("model")
    if not isinstance(model, Mapping):
        model = {}

    def text(value: object) -> str | None:
        return None if value is None else str(value)

    return BuildRecord(model=str(model.get("id", "MODEL")), weights=text(model.get("weights")),
                       precision=text(data.get("precision")), name=text(data.get("name")), out=str(engine_dir))


def _first_malformed(data: Mapping[str, Any]) -> str | None:
    """The first section of a manifest dict that does not parse, in the words the load error uses."""
    if not isinstance(data.get("stages"), list) or not data["stages"]:
        return "the manifest lists no stages"
    if not isinstance(data.get("model"), Mapping) or "id" not in data["model"]:
        return "the model section is malformed"
    for what, parse in (("a stage spec is malformed", lambda: [StageRecord.from_dict(e) for e in data["stages"]]),
                        ("the merge settings are malformed", lambda: MergeSettings.from_dict(data["merge"])),
                        ("the shapes section is malformed", lambda: ShapeRanges.from_dict(data["shapes"]))):
        try:
            parse()
        except (KeyError, TypeError, ValueError, AttributeError, CatomeError) as exc:
            return f"{what} ({exc})"
    return None
