"""The engine folder's ``manifest.json``: what was built, from what, for which shapes, and how to rebuild it.

Written last by a build (atomically), read first by every load. ``load``
checks the format version, the manifest's own hash (``manifest_sha256`` =
sha256 of the canonical JSON of every other key: ``sort_keys=True``,
separators ``(",", ":")``), the presence, size and sha256 of every stage
file, and that the specs and merge settings parse; any problem is a
:class:`CatomeError` that names the ``catome-export build`` command to
rebuild the folder.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import platform
import shlex
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from catome_export._version import __version__
from catome_export.errors import CatomeError
from catome_export.export.fsutil import atomic_write_text, sha256_file
from catome_export.export.stages import StageSpec

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CORE_KEYS = ("format_version", "catome_export_version", "name", "model", "precision", "merge", "sites", "shapes",
             "stages", "engine_backend", "trt", "tools", "created")
"""Keys every manifest has, in file order (``manifest_sha256`` comes last; other keys go in between)."""
PRECISIONS = ("fp32", "fp16")
ENGINE_BACKENDS = ("ort", "trt")


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


def canonical_hash(data: dict) -> str:
    """sha256 of the canonical JSON of ``data`` without its ``manifest_sha256`` key."""
    body = {k: v for k, v in data.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _generic_rebuild(engine_dir: Path) -> str:
    name = engine_dir.name or "NAME"
    model = name if name in ("tiny", "sd15") else "MODEL"
    return f"catome-export build --model {model} --name {name} --out {shlex.quote(str(engine_dir))}"


@dataclass
class Manifest:
    """Contents of ``manifest.json`` (see docs/export.md for every key)."""

    name: str
    model: dict
    """``{"id", "weights", "weights_hash", "unet_config"}``."""
    precision: str
    merge: dict
    """``MergeSettings.to_dict()``."""
    sites: list[dict]
    """``[{"index", "path", "downsample", "channels"}]``."""
    shapes: dict
    """``{"batch": [lo, hi], "latent_height": [lo, hi], "latent_width": [lo, hi], "text_len", "text_dim", "opt": {...}}``."""
    stages: list[dict]
    """Per stage: file, external_data, sha256, bytes, site, next_site, inputs, outputs, engine."""
    engine_backend: str = "ort"
    trt: dict | None = None
    tools: dict = field(default_factory=tool_versions)
    created: str = ""
    format_version: int = FORMAT_VERSION
    catome_export_version: str = __version__
    extra: dict = field(default_factory=dict)
    """Other top-level keys (``build``: the build arguments, ``audit``, ``export``)."""
    manifest_sha256: str = ""
    engine_dir: Path | None = field(default=None, compare=False)
    """Folder it was loaded from or saved to (not stored)."""

    # -- (de)serialisation ------------------------------------------------------------
    def to_dict(self) -> dict:
        d: dict[str, Any] = {
            "format_version": self.format_version, "catome_export_version": self.catome_export_version,
            "name": self.name, "model": self.model, "precision": self.precision, "merge": self.merge,
            "sites": self.sites, "shapes": self.shapes, "stages": self.stages,
            "engine_backend": self.engine_backend, "trt": self.trt, "tools": self.tools, "created": self.created,
        }
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
    def from_dict(cls, data: dict, engine_dir: Path | None = None) -> "Manifest":
        known = set(CORE_KEYS) | {"manifest_sha256"}
        return cls(
            name=data["name"], model=data["model"], precision=data["precision"], merge=data["merge"],
            sites=data["sites"], shapes=data["shapes"], stages=data["stages"],
            engine_backend=data["engine_backend"], trt=data.get("trt"), tools=data.get("tools") or {},
            created=data.get("created", ""), format_version=data["format_version"],
            catome_export_version=data.get("catome_export_version", ""),
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
        generic = _generic_rebuild(engine_dir)
        if engine_dir.is_file():
            hint = f"pass its folder {engine_dir.parent}" if engine_dir.name == MANIFEST_FILE else \
                "pass the folder that catome-export build wrote"
            raise CatomeError(f"{engine_dir} is a file, not an engine folder: {hint}")
        if not engine_dir.is_dir():
            raise CatomeError(f"engine folder {engine_dir} does not exist: build it with {generic}")
        if not path.is_file():
            raise CatomeError(f"{engine_dir} has no {MANIFEST_FILE} (not a finished build): build it with {generic}")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CatomeError(f"{path} is unreadable ({type(exc).__name__}): rebuild with {generic}") from None
        if not isinstance(data, dict):
            raise CatomeError(f"{path} is not a manifest (not a JSON object): rebuild with {generic}")
        recorded = data.get("build_command")
        if isinstance(recorded, str) and recorded.startswith("catome-export build "):
            generic = recorded  # the command the folder was built with (a hint; the checks below still apply)
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CatomeError(f"{path} has format_version {version!r}; this catome-export ({__version__}) reads "
                              f"version {FORMAT_VERSION}: rebuild with {generic}")
        missing = [k for k in (*CORE_KEYS, "manifest_sha256") if k not in data]
        if missing:
            raise CatomeError(f"{path} lacks {', '.join(missing)}: rebuild with {generic}")
        if canonical_hash(data) != data["manifest_sha256"]:
            raise CatomeError(f"{path} was modified or damaged (its manifest_sha256 does not match its contents): "
                              f"rebuild with {generic}")
        try:
            manifest = cls.from_dict(data, engine_dir)
        except (KeyError, TypeError) as exc:
            raise CatomeError(f"{path} is malformed ({exc}): rebuild with {generic}") from None
        manifest._validate()
        if check_files:
            manifest.check_files(check_hashes)
        return manifest

    # -- validation -----------------------------------------------------------------------
    def _fail(self, what: str) -> CatomeError:
        return CatomeError(f"engine {self.engine_dir or self.name}: {what}: rebuild it with {self.rebuild_command()}")

    def _validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise self._fail(f"unknown precision {self.precision!r}")
        if self.engine_backend not in ENGINE_BACKENDS:
            raise self._fail(f"unknown engine_backend {self.engine_backend!r}")
        if not isinstance(self.stages, list) or not self.stages:
            raise self._fail("the manifest lists no stages")
        if not isinstance(self.model, dict) or "id" not in self.model:
            raise self._fail("the model section is malformed")
        try:
            specs = self.stage_specs()
        except (KeyError, TypeError, ValueError, CatomeError) as exc:
            raise self._fail(f"a stage spec is malformed ({exc})") from None
        if [s.index for s in specs] != list(range(len(specs))):
            raise self._fail("stage indices are not 0..K in order")
        try:
            self.settings()
        except (KeyError, TypeError, ValueError, CatomeError) as exc:
            raise self._fail(f"the merge settings are malformed ({exc})") from None
        try:
            self.ranges()
        except (KeyError, TypeError, ValueError) as exc:
            raise self._fail(f"the shapes section is malformed ({exc})") from None
        if self.engine_backend == "trt" and not all(isinstance(e.get("engine"), dict) for e in self.stages):
            raise self._fail("a TensorRT build lists a stage without an engine file")

    def files(self) -> list[tuple[str, int | None, str | None]]:
        """(file name, bytes, sha256) of every artifact the manifest vouches for."""
        out = []
        for entry in self.stages:
            out.append((entry["file"], entry.get("bytes"), entry.get("sha256")))
            if entry.get("external_data"):
                out.append((entry["external_data"], entry.get("external_data_bytes"),
                            entry.get("external_data_sha256")))
            fused = entry.get("ort_optimized")  # ONNX Runtime's fused graph (export/ort_optimize.py), if built
            if isinstance(fused, dict) and fused.get("file"):
                out.append((fused["file"], fused.get("bytes"), fused.get("sha256")))
                if fused.get("external_data"):
                    out.append((fused["external_data"], fused.get("external_data_bytes"),
                                fused.get("external_data_sha256")))
            engine = entry.get("engine")
            if isinstance(engine, dict) and engine.get("file"):
                out.append((engine["file"], engine.get("bytes"), engine.get("sha256")))
        return out

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
        return [StageSpec.from_dict(e) for e in self.stages]

    def settings(self):
        from catome_export.merging.settings import MergeSettings

        return MergeSettings.from_dict(self.merge)

    def ranges(self) -> dict[str, tuple[int, int]]:
        """Built ranges: batch, latent_height, latent_width as (lo, hi)."""
        out = {}
        for key in ("batch", "latent_height", "latent_width"):
            value = self.shapes[key]
            lo, hi = (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
            out[key] = (lo, hi)
        return out

    def check_shapes(self, batch: int, latent_h: int, latent_w: int) -> None:
        """CatomeError unless (batch, latent size) lies inside the built ranges (naming them and the rebuild)."""
        r = self.ranges()
        problems, overrides = [], {}
        if not r["batch"][0] <= batch <= r["batch"][1]:
            problems.append(f"batch {batch} is outside the built range {r['batch'][0]}..{r['batch'][1]}")
            overrides.update(min_batch=min(batch, r["batch"][0]), max_batch=max(batch, r["batch"][1]))
        for key, value in (("latent_height", latent_h), ("latent_width", latent_w)):
            lo, hi = r[key]
            if not lo <= value <= hi:
                problems.append(f"{key.replace('_', ' ')} {value} ({value * 8} px) is outside the built range "
                                f"{lo}..{hi} ({lo * 8}..{hi * 8} px)")
        if problems:
            lows = [r["latent_height"][0], r["latent_width"][0], latent_h, latent_w]
            highs = [r["latent_height"][1], r["latent_width"][1], latent_h, latent_w]
            if any("latent" in p for p in problems):
                overrides.update(min_resolution=8 * min(lows), max_resolution=8 * max(highs))
            raise CatomeError(f"engine {self.name}: {'; '.join(problems)}. Use a size inside the range, or rebuild "
                              f"for it: {self.rebuild_command(**overrides)}")

    def rebuild_command(self, **overrides: Any) -> str:
        """The ``catome-export build`` command that makes this folder again (with ``overrides`` of its flags)."""
        args = dict(self.extra.get("build") or {})
        if not args:
            args = {"model": self.model.get("id", "MODEL"), "weights": self.model.get("weights"),
                    "precision": self.precision, "name": self.name}
            if self.engine_dir is not None:
                args["out"] = str(self.engine_dir)
        args.update(overrides)
        return build_command(args)


FLAG_ORDER = ("model", "weights", "precision", "backend", "resolution", "min_resolution", "max_resolution", "batch",
              "min_batch", "max_batch", "threshold", "ratio", "merge_fraction", "schedule", "step_base",
              "opt_merge_fraction", "ort_optimize", "name", "out")


def build_command(args: dict) -> str:
    """Format build arguments as a ``catome-export build`` command line (``None`` values left out)."""
    args = dict(args)
    if "min_resolution" in args or "max_resolution" in args:
        args.pop("resolution", None)
    if "min_batch" in args or "max_batch" in args:
        args.pop("batch", None)
    parts = ["catome-export", "build"]
    for key in FLAG_ORDER:
        value = args.get(key)
        if value is None or value is False:
            continue
        parts += [f"--{key.replace('_', '-')}", shlex.quote(str(value))]
    return " ".join(parts)
