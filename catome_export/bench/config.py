"""Benchmark settings: one frozen dataclass shared by the API and ``catome-export bench``."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from catome_export.checks import check_float, check_int, is_int
from catome_export.choices import Precision
from catome_export.defaults import DEFAULT_R_MULTIPLE, DEFAULT_SCHEDULE
from catome_export.errors import CatomeError

BACKENDS = ("eager", "eager-tome", "eager-catome", "engine", "engine-unstaged", "engine-unfused",
            "engine-unstaged-unfused")
"""What a benchmark can time.

``eager``: the plain diffusers U-Net. ``eager-tome``: the eager patch matching
at every step (no cache, as ToMe). ``eager-catome``: the eager patch with
cached plans (the checkpoint is the warm-up call; timed calls reuse it).
``engine``: the staged graphs through the runtime. ``engine-unstaged``: one
un-cut ONNX graph of the same U-Net in ONNX Runtime with the same session
options (no merging), to measure what cutting costs. ``engine-unfused`` and ``engine-unstaged-unfused``: the same
two on ONNX Runtime with the standard graphs whatever ``ort_optimize`` says, to time ONNX Runtime's fusions
against them in the same run."""

MERGING_BACKENDS = ("eager-tome", "eager-catome", "engine", "engine-unfused")
UNFUSED_BACKENDS = {"engine-unfused": "engine", "engine-unstaged-unfused": "engine-unstaged"}
"""Backends on the standard graphs -> the backend they are the unfused twin of."""
"""Backends that take a merge fraction or threshold; the others run at merge fraction 0 only."""

LATENT_KINDS = ("smooth", "noise")
PRECISIONS = Precision.values()


def default_workdir() -> Path:
    """Where engines and the unstaged graph are built when no ``--engine`` is given."""
    return Path(tempfile.gettempdir()) / "catome-bench"


@dataclass(frozen=True)
class BenchConfig:
    """What to time, at which shapes, how often."""

    model: str = "tiny"
    """Registry name (``tiny``, ``tiny-xl``, ``sd15``, ``sd21``, ``sdxl``) or a local diffusers folder."""
    weights: str = "random"
    """``random`` (seeded, the architecture only: speed does not depend on weights), ``pretrained``, or the path of a
    single-file checkpoint of ``model``'s architecture."""
    engine_dir: Path | None = None
    """A built engine folder for ``engine``; None builds one under ``workdir`` (reused when it fits)."""
    backends: tuple[str, ...] = ("eager", "eager-catome", "engine")
    """Subset of :data:`BACKENDS`, timed in this order."""
    resolutions: tuple[int, ...] = ()
    """Image sizes in pixels (square; latent = size / 8); empty = the model's default."""
    batch: int = 2
    """U-Net batch (2 = one image with classifier-free guidance)."""
    merge_fractions: tuple[float, ...] = (0.0, 0.5, 0.75)
    """Forced r per site = round(f * #src): speed independent of weights and inputs."""
    threshold: float | None = None
    """Also time the adaptive path at this CA-ToMe threshold (r from the inputs; use smooth latents)."""
    r_multiple: int = DEFAULT_R_MULTIPLE
    """Every merging row rounds r down to a multiple of this (``MergeSettings.r_multiple``; 1: off)."""
    latents: str = "smooth"
    """Start latents: ``smooth`` (blurred, self-similar) or ``noise``."""
    steps: int = 0
    """When > 0, also time an ``steps``-call denoising loop with ``schedule`` (checkpoint and cached steps mixed)."""
    schedule: str = DEFAULT_SCHEDULE
    """Checkpoint schedule of the ``steps`` loop."""
    repeats: int = 5
    """Timed cached-step calls per row."""
    checkpoint_repeats: int | None = None
    """Timed checkpoint-step calls per row in sequential mode (None: min(repeats, 3)); interleaved rounds time
    one checkpoint call per row and round."""
    warmup: int = 1
    """Untimed calls before timing; the first is a checkpoint (it fills the plan caches)."""
    threads: int | None = None
    """torch and ONNX Runtime intra-op threads, the same for every backend; None = physical cores."""
    device: str = "cpu"
    """``cpu`` or ``cuda`` (``cuda:N``)."""
    precision: str = "fp32"
    """``fp32`` or ``fp16`` (fp16 needs a CUDA device)."""
    engine_backend: str = "auto"
    """Runtime backend of ``engine`` (``auto``, ``trt``, ``ort``, ``ort-cpu``, ``ort-cuda``, ``torch``)."""
    workdir: Path = field(default_factory=default_workdir)
    """Build folder for engines and the unstaged graph (outside the repository; large for sd15)."""
    text_len: int = 77
    """Tokens of the text embeddings."""
    seed: int = 0
    """Seed of the latents and text embeddings."""
    interleave: bool = True
    """Time all rows of a shape in rotated rounds with every backend loaded (fair on a busy machine), or one
    backend at a time (less memory)."""
    one_at_a_time: bool = False
    """With ``interleave``: load one backend at a time (as sequential, for less memory) and time each backend's
    rows in rotated rounds."""
    stage_timings: bool = True
    """Time every stage of ``engine`` too (one synchronisation per stage on CUDA)."""
    ort_options: tuple[tuple[str, object], ...] = ()
    """Extra ONNX Runtime backend options (``OrtOptions`` fields, e.g. ``("cpu_mem_arena", False)``) for the
    engine and the unstaged graph alike; threads come from ``threads``."""
    ort_optimize: bool = True
    """ONNX Runtime engines and the unstaged graph run ONNX Runtime's fused graphs (built by ``catome-export build``,
    catome_export.export.ort_optimize); False runs the standard graphs (``--ort-optimize off``)."""
    profile_dir: Path | None = None
    """When set, also profile where the time goes (ONNX Runtime's profiler for the engine's stages and the
    unstaged graph, torch.profiler for eager), traces written here."""

    def __post_init__(self) -> None:
        backends = tuple(self.backends)
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown or not backends:
            raise CatomeError(f"unknown backends {unknown}: choose from {', '.join(BACKENDS)}" if unknown
                              else f"give at least one backend: {', '.join(BACKENDS)}")
        if len(set(backends)) != len(backends):
            raise CatomeError(f"backends are listed twice: {list(backends)}")
        object.__setattr__(self, "backends", backends)
        res = tuple(self.resolutions)
        for r in res:
            if not is_int(r) or r < 16 or r % 8:
                raise CatomeError(f"resolution must be a multiple of 8 of at least 16 pixels, got {r!r}")
        object.__setattr__(self, "resolutions", res)
        fractions = tuple(self.merge_fractions)
        for f in fractions:
            check_float("merge fraction", f, 0, 1)
        if not fractions and self.threshold is None:
            raise CatomeError("give at least one merge fraction (e.g. 0,0.5,0.75) or a --threshold")
        object.__setattr__(self, "merge_fractions", tuple(float(f) for f in fractions))
        check_int("r_multiple", self.r_multiple, 1)
        if self.threshold is not None:
            check_float("threshold", self.threshold, -1, 1)
        from catome_export.models.registry import parse_weights

        parse_weights(self.weights)  # random, pretrained or an existing checkpoint file
        if self.latents not in LATENT_KINDS:
            raise CatomeError(f"latents must be one of {', '.join(LATENT_KINDS)}, got {self.latents!r}")
        if self.precision not in PRECISIONS:
            raise CatomeError(f"precision must be fp32 or fp16, got {self.precision!r}")
        if self.precision == "fp16" and not self.device.startswith("cuda"):
            raise CatomeError("fp16 benchmarks need a CUDA device (--device cuda); on the CPU use fp32")
        if not (self.device == "cpu" or self.device == "cuda" or
                (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise CatomeError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        check_int("batch", self.batch, 1)
        check_int("repeats", self.repeats, 1)
        check_int("warmup", self.warmup, 1)
        check_int("text length", self.text_len, 1)
        check_int("steps", self.steps, 0)
        check_int("seed", self.seed, 0)
        if self.checkpoint_repeats is not None:
            check_int("checkpoint repeats", self.checkpoint_repeats, 0)
        if self.one_at_a_time and not self.interleave:
            raise CatomeError("--one-at-a-time and --sequential both load one backend at a time; choose one: "
                              "--one-at-a-time times a backend's rows in interleaved rounds, --sequential one "
                              "after the other")
        if self.threads is not None:
            check_int("threads", self.threads, 1)
        if self.engine_dir is not None:
            object.__setattr__(self, "engine_dir", Path(self.engine_dir))
        object.__setattr__(self, "workdir", Path(self.workdir))
        opts = tuple((str(k), v) for k, v in dict(self.ort_options).items())
        if any(k in ("intra_op_threads", "inter_op_threads") for k, _ in opts):
            raise CatomeError("set ONNX Runtime threads with --threads (the same for every backend), "
                              "not with an ONNX Runtime option")
        if any(k == "fused_graphs" for k, _ in opts):
            raise CatomeError("choose ONNX Runtime's fused graphs with --ort-optimize on|off, not with an "
                              "ONNX Runtime option")
        if not isinstance(self.ort_optimize, bool):
            raise CatomeError(f"ort_optimize must be true or false (--ort-optimize on|off), got {self.ort_optimize!r}")
        if opts:
            from catome_export.backends.ort import OrtOptions

            OrtOptions.from_mapping(dict(opts))  # CatomeError naming the known options for an unknown key
        object.__setattr__(self, "ort_options", opts)
        if self.profile_dir is not None:
            object.__setattr__(self, "profile_dir", Path(self.profile_dir))
            if self.device != "cpu":
                raise CatomeError("--profile profiles ONNX Runtime on the CPU: use it with --device cpu")

    @property
    def checkpoint_calls(self) -> int:
        """Timed checkpoint calls per merging row."""
        if self.interleave:
            return self.repeats
        return self.checkpoint_repeats if self.checkpoint_repeats is not None else min(self.repeats, 3)

    def to_dict(self) -> dict:
        return {
            "model": self.model, "weights": self.weights,
            "engine_dir": None if self.engine_dir is None else str(self.engine_dir),
            "backends": list(self.backends), "resolutions": list(self.resolutions), "batch": self.batch,
            "merge_fractions": list(self.merge_fractions), "threshold": self.threshold,
            "r_multiple": self.r_multiple, "latents": self.latents,
            "steps": self.steps, "schedule": self.schedule, "repeats": self.repeats, "interleave": self.interleave,
            "one_at_a_time": self.one_at_a_time,
            "checkpoint_repeats": self.checkpoint_calls, "warmup": self.warmup, "threads": self.threads,
            "device": self.device, "precision": self.precision, "engine_backend": self.engine_backend,
            "text_len": self.text_len, "seed": self.seed,
            "ort_options": dict(self.ort_options), "ort_optimize": self.ort_optimize,
            "profile_dir": None if self.profile_dir is None else str(self.profile_dir),
        }
