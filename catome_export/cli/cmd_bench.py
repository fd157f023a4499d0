"""``catome-export bench``: latency of eager PyTorch, eager ToMe / CA-ToMe and the engines, per U-Net call."""

from __future__ import annotations

import argparse
import sys
from typing import Any
from pathlib import Path

from catome_export.backends.select import BACKEND_NAMES
from catome_export.choices import Precision
from catome_export.cli.vocab import deprecate
from catome_export.defaults import DEFAULT_SCHEDULE
from catome_export.errors import CatomeError
from catome_export.fsutil import Outputs, check_writable_file

DEFAULT_BACKENDS = "eager,eager-catome,engine"
DEFAULT_FRACTIONS = "0,0.5,0.75"

DESCRIPTION = """\
Time one U-Net call per backend, resolution and merge setting: a warm-up
call per row first (a checkpoint that fills the plan caches), then --repeats
rounds in which every row runs one timed checkpoint step (matching at every
site) and one timed cached step (plans reused), in an order rotated from
round to round so that a busy machine slows every row alike; median, min and
p90 of the cached steps, and the controller's share of both kinds. --merge-fractions forces r per
site (speed independent of weights); --threshold also times the adaptive path
on smooth latents. Prints a markdown table; --json and --plot save the rows
and a latency-vs-merge-fraction plot. SDXL-style models (tiny-xl, sdxl) get
seeded added conditioning (text_embeds, time_ids of an uncropped image at the
resolution) and merge at their own level (2).

backends:
  eager            the plain diffusers U-Net (merge fraction 0)
  eager-tome       the eager patch, matching at every step (no cache)
  eager-catome     the eager patch, cached plans
  engine           the staged graphs through the runtime (--engine DIR, or
                   built for --model under --workdir and reused)
  engine-unstaged  the whole U-Net as one ONNX graph in ONNX Runtime with the
                   same session options (merge fraction 0): what cutting costs
  engine-unfused, engine-unstaged-unfused
                   the same two on the standard graphs, without ONNX Runtime's
                   fusions: their effect in the same run (--ort-optimize)

example:
  catome-export bench --model tiny --resolution 256 --repeats 5
  catome-export bench --model sd15 --weights random --resolution 512 --batch 2 \\
      --backends eager,engine,engine-unstaged --merge-fractions 0,0.5,0.75 --repeats 3 \\
      --json benchmarks/results/sd15.json --plot benchmarks/results/sd15.png
"""


def _list(text: str, kind: type, what: str) -> tuple:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise CatomeError(f"{what} is empty: give a comma-separated list")
    try:
        return tuple(kind(t) for t in items)
    except ValueError:
        raise CatomeError(f"{what} must be a comma-separated list of {kind.__name__}s, got {text!r}") from None


def config_from_args(args: argparse.Namespace):
    """The :class:`BenchConfig` of parsed arguments."""
    from catome_export.bench.config import BenchConfig, default_workdir

    given_fractions = DEFAULT_FRACTIONS if args.merge_fractions is None else args.merge_fractions
    fractions: tuple = _list(given_fractions, float, "--merge-fractions") if given_fractions else ()
    resolutions = tuple(args.resolution or ())
    model, weights = _model_and_weights(args)
    return BenchConfig(
        model=model or "tiny", weights=weights or "random", engine_dir=Path(args.engine) if args.engine else None,
        backends=_list(args.backends or DEFAULT_BACKENDS, str, "--backends"), resolutions=resolutions,
        batch=args.batch,
        merge_fractions=fractions, threshold=args.threshold, r_multiple=_r_multiple(args), latents=args.latents,
        steps=args.steps,
        schedule=args.schedule, repeats=args.repeats, checkpoint_repeats=args.checkpoint_repeats,
        warmup=args.warmup, threads=args.threads, device=_device(args.device), precision=args.precision,
        engine_backend=args.backend, workdir=Path(args.workdir) if args.workdir else default_workdir(),
        text_len=args.text_len, seed=args.seed, stage_timings=not args.no_stage_timings,
        interleave=not args.sequential, one_at_a_time=args.one_at_a_time,
        profile_dir=Path(args.profile) if args.profile else None,
        ort_options=tuple(_ort_option(text) for text in args.ort_option or ()),
        ort_optimize=args.ort_optimize == "on",
    )


def _model_and_weights(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(architecture, weights) from --model/--weights (a checkpoint file as the model: its architecture, the file),
    the --engine's where not given."""
    model, weights = args.model, args.weights
    if model is not None:
        from catome_export.models.registry import resolve_source

        model, spec = resolve_source(model, weights)
        weights = None if spec is None else str(spec)
    elif weights is not None and not args.engine:
        raise CatomeError("--weights names the weights of --model's architecture: give --model too")
    if args.engine and (model is None or weights is None):
        engine_model = _engine_model(Path(args.engine))
        model = model or engine_model.get("id")
        weights = weights or engine_model.get("weights")
    return model, weights


def _device(name: str) -> str:
    """``auto``: ``cuda`` when a CUDA device is usable, else ``cpu``; any other name as given (the config checks it)."""
    if name != "auto":
        return name
    from catome_export.devices import resolve_device

    return str(resolve_device(name))


def _ort_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, bool | int | str)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise CatomeError(f"--ort-option {text!r}: use KEY=VALUE, e.g. cpu_mem_arena=false")
    v = value.strip()
    parsed: object = v
    if v.lower() in ("true", "false"):
        parsed = v.lower() == "true"
    elif v.lstrip("-").isdigit():
        parsed = int(v)
    return key.strip(), parsed


def _engine_model(engine_dir: Path) -> dict:
    """The model section of an engine's manifest (the eager rows use the same model by default)."""
    from catome_export.engine.manifest import Manifest

    if not engine_dir.is_dir():
        raise CatomeError(f"--engine {engine_dir} is not a folder: build one with catome-export build, "
                          "or leave --engine out to build one for --model")
    return Manifest.load(engine_dir, check_files=False).model.to_dict()


def _check_outputs(args: argparse.Namespace) -> None:
    for flag, value, suffix in (("--json", args.json, ".json"), ("--plot", args.plot, ".png")):
        if value is None:
            continue
        path = Path(value)
        if path.suffix.lower() != suffix:
            raise CatomeError(f"{flag} {value}: the file name must end in {suffix}")
        check_writable_file(path, flag)
    if args.plot is not None:
        from catome_export.extras import require

        require("plot", "--plot")


def generation_config_from_args(args: argparse.Namespace) -> Any:
    """Generation mode's settings from the flags (``--generation N``)."""
    from catome_export.bench.config import default_workdir
    from catome_export.bench.generation import GENERATION_BACKENDS, GenerationConfig
    from catome_export.featurecache import FeatureCacheSettings, parse_feature_cache

    cache = parse_feature_cache(args.feature_cache) if args.feature_cache else FeatureCacheSettings(3, 0)
    if cache is None:
        raise CatomeError("generation mode compares rows with and without feature caching: give --feature-cache I,b "
                          "(default 3,0), not off")
    given = _list(args.backends, str, "--backends") if args.backends is not None else GENERATION_BACKENDS
    model, weights = _model_and_weights(args)
    resolutions = args.resolution or [None]
    if len(resolutions) > 1:
        raise CatomeError("generation mode times one resolution: give one --resolution")
    fractions = _list(args.merge_fractions, float, "--merge-fractions") if args.merge_fractions else (0.0, 0.75)
    if args.threshold is not None or args.steps:
        raise CatomeError("generation mode times forced merge fractions over whole generations: leave out "
                          "--threshold and --steps")
    return GenerationConfig(
        model=model or "tiny", weights=weights or "random", engine_dir=Path(args.engine) if args.engine else None,
        backends=tuple(given), resolution=resolutions[0], batch=args.batch, steps=args.generation,
        rounds=args.rounds, merge_fractions=tuple(fractions), feature_cache=cache, device=_device(args.device),
        threads=args.threads, engine_backend=args.backend,
        workdir=Path(args.workdir) if args.workdir else default_workdir() / "generation", seed=args.seed,
        latents=args.latents, text_len=args.text_len, r_multiple=_r_multiple(args))


def _r_multiple(args: argparse.Namespace) -> int:
    from catome_export.cli.cmd_generate import r_multiple_arg
    from catome_export.defaults import DEFAULT_R_MULTIPLE

    q = r_multiple_arg(args)
    return DEFAULT_R_MULTIPLE if q is None else q


def run_generation(args: argparse.Namespace) -> int:
    from catome_export.bench.generation import run_generation_bench

    if args.plot:
        raise CatomeError("--plot draws latency against merge fraction per call; generation mode writes a table and "
                          "--json")
    config = generation_config_from_args(args)
    result = run_generation_bench(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    _print_result(f"{config.model} on {result.device.get('name', config.device)}", result, args)
    return 0


def _print_result(title: str, result: Any, args: argparse.Namespace) -> None:
    """The table, the notes and the files a benchmark result writes (--json, and --plot where it draws one)."""
    print(f"# {title}")
    print()
    print(result.markdown(), end="")
    for note in result.notes:
        print(f"\nnote: {note}")
    outputs = Outputs()
    if args.json:
        written = outputs.save(args.json, result.save_json, "--json")
        if written is not None:
            print(f"\nwrote {written}")
    if args.plot:
        written = outputs.save(args.plot, result.save_plot, "--plot")
        if written is not None:
            print(f"wrote {written}")
    outputs.finish()


def run(args: argparse.Namespace) -> int:
    from catome_export.bench.runner import run_bench

    _check_outputs(args)
    if args.generation:
        return run_generation(args)
    if args.feature_cache:
        raise CatomeError("--feature-cache changes the cost of each call with the step: time it with --generation N "
                          "(whole N-step generations)")
    config = config_from_args(args)
    if config.engine_dir is not None and not config.engine_dir.is_dir():
        raise CatomeError(f"--engine {config.engine_dir} is not a folder: build one with catome-export build, "
                          "or leave --engine out to build one for --model")
    result = run_bench(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    _print_result(f"{result.config.get('model')} on {result.header()}", result, args)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from catome_export.bench.config import BACKENDS

    p = sub.add_parser("bench", help="time eager PyTorch, eager ToMe / CA-ToMe and the engines per U-Net call",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", metavar="DIR", help="a built engine folder for the engine backend "
                   "(default: build one for --model under --workdir, reused when it fits)")
    p.add_argument("--model", help="tiny, tiny-xl, sd15, sd21, sdxl, a local diffusers folder, or a single-file "
                                    "checkpoint (.safetensors/.ckpt) (default: the --engine's model, else tiny)")
    p.add_argument("--weights", metavar="random|pretrained|FILE",
                   help="seeded random weights (speed does not depend on them; the default without --engine), "
                        "pretrained, or a single-file checkpoint of --model's architecture (default: random, with "
                        "--engine the engine's)")
    p.add_argument("--backends", default=None, metavar="LIST",
                   help=f"comma-separated, from {', '.join(BACKENDS)} (default: eager,eager-catome,engine); "
                        "generation mode: from eager, eager-deepcache, engine (default all three)")
    p.add_argument("--resolution", type=int, nargs="+", metavar="N",
                   help="image sizes in pixels, multiples of 8 (default: the model's, 256 tiny / 512 sd15)")
    p.add_argument("--batch", type=int, default=2, help="U-Net batch (default 2: one image with CFG)")
    p.add_argument("--merge-fractions", default=None, metavar="LIST",
                   help=f"forced share of src tokens merged per site (default {DEFAULT_FRACTIONS}; generation mode "
                        "0,0.75); '' with --threshold only")
    p.add_argument("--threshold", type=float, help="also time the adaptive path at this CA-ToMe threshold (default: none, forced fractions only)")
    from catome_export.cli.cmd_generate import R_MULTIPLE_HELP

    p.add_argument("--r-multiple", default=None, metavar="Q",
                   help=f"{R_MULTIPLE_HELP}; applies to every merging row, forced fractions included, whatever the "
                        "engine was built with (default 1)")
    p.add_argument("--latents", choices=("smooth", "noise"), default="smooth",
                   help="start latents (default smooth: self-similar, so thresholds merge with random weights)")
    p.add_argument("--steps", type=int, default=0, metavar="N",
                   help="also time an N-call denoising loop with --schedule (default 0: off)")
    p.add_argument("--schedule", default=DEFAULT_SCHEDULE,
                   help=f"checkpoint schedule of the --steps loop (default {DEFAULT_SCHEDULE})")
    p.add_argument("--repeats", type=int, default=5, help="timed cached-step calls per row (default 5)")
    p.add_argument("--checkpoint-repeats", type=int, metavar="N",
                   help="with --sequential: timed checkpoint-step calls per merging row (default min(repeats, 3)); "
                        "interleaved rounds time one per row and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first, the first a checkpoint (default 1)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch and ONNX Runtime intra-op threads for every backend (default: physical cores)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--precision", choices=Precision.values(), default=str(Precision.FP32), help="fp16 needs --device cuda (default fp32)")
    p.add_argument("--backend", default="auto", choices=BACKEND_NAMES,
                   help="runtime backend of the engine rows (default auto)")
    deprecate(p, "--engine-backend", "--backend")
    p.add_argument("--workdir", metavar="DIR", help="where engines and the unstaged graph are built "
                   "(default: <tmp>/catome-bench; sd15 needs about 7 GB)")
    p.add_argument("--text-len", type=int, default=77, help="tokens of the text embeddings (default 77)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents and text embeddings (default 0)")
    p.add_argument("--sequential", action="store_true",
                   help="time one backend at a time instead of interleaved rounds with every backend loaded "
                        "(less memory; rows minutes apart see different loads on a busy machine)")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="load one backend at a time, as --sequential does (for models whose backends do not fit "
                        "in memory together: SDXL in fp32 held 10.3 GiB for eager and 12.1 GiB for the engine at 1024 px), "
                        "but time each backend's own rows (its merge fractions) in interleaved rounds")
    p.add_argument("--no-stage-timings", action="store_true", help="do not time the engine's stages one by one")
    p.add_argument("--ort-option", action="append", metavar="KEY=VALUE",
                   help="an ONNX Runtime backend option for the engine and the unstaged graph alike "
                        "(e.g. cpu_mem_arena=false, allow_spinning=false); repeatable (default: none)")
    p.add_argument("--ort-optimize", choices=("on", "off"), default="on",
                   help="engine and engine-unstaged on ONNX Runtime run the graphs with ONNX Runtime's own fusions "
                        "(fused attention, layer norm, Gelu; default on) or the standard graphs (off); add "
                        "engine-unfused / engine-unstaged-unfused to --backends to time both in one run")
    p.add_argument("--profile", metavar="DIR",
                   help="also profile where the time goes (CPU): the engine's stages and the unstaged graph with "
                        "ONNX Runtime's profiler, eager with torch.profiler; per stage, op type and kind of work; "
                        "traces go to DIR, the summary to the table and the JSON (default: no profile)")
    p.add_argument("--generation", type=int, default=0, metavar="N",
                   help="generation mode: time whole N-step DDIM generations (e.g. 50) of eager, eager with the "
                        "DeepCache package's helper, and the engine at each merge fraction without and with "
                        "--feature-cache; reports the mean U-Net time per step (default 0: per-call mode)")
    p.add_argument("--rounds", type=int, default=2, metavar="N",
                   help="generation mode: generations per row, in rounds with the row order rotated (default 2)")
    p.add_argument("--feature-cache", "--deepcache", default=None, metavar="I,b",
                   help="generation mode: the feature cache of the cached rows (cache_interval, cache_branch_id as "
                        "in DeepCacheSDHelper; default 3,0)")
    p.add_argument("--json", metavar="FILE", help="write the rows and the device to this .json file (default: none)")
    p.add_argument("--plot", metavar="FILE", help="write latency against merge fraction to this .png file (default: none)")
    p.set_defaults(func=run)
