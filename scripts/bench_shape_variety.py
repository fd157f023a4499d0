"""Bounded shape variety: distinct (site, r) shapes, resident memory and step time with r_multiple q = 1 and q > 1.

Usage:
    python scripts/bench_shape_variety.py --engine ENGINE_DIR [--r-multiples 1,64] [--generations 20] [--steps 50]
        [--budget-s S] [--sequential] [--threads N] --json FILE.json --md FILE.md

Each q runs in a child process of its own (ONNX Runtime on the CPU, its
default options: the CPU arena on, one arena shared by the process's
sessions), so each one's resident memory is its own. By default both
children stay loaded and take turns, one generation each, never computing at
the same time (interleaved: a busy machine slows both alike); ``--sequential``
runs one child after the other (when two runtimes do not fit in memory).
``--budget-s`` stops giving a child generations once its generations took
that many seconds (0: no limit), so a large model runs as many as fit.

A generation is a DDIM loop of ``--steps`` U-Net calls with classifier-free
guidance (batch 2: one image), the engine's merge settings (threshold,
checkpoint schedule) with r rounded to a multiple of q, and no feature cache.
Generation g uses its own seed for the start latents and for the two text
embeddings (random, standing in for a prompt and the empty prompt: the
models here have random weights and no tokenizer), and start latents
blurred by a width that cycles with g, so the merge counts r vary from
generation to generation as they do with real prompts.

Recorded per q: the distinct (site, r) shapes the U-Net calls met (and the
distinct r tuples over all sites, what a CUDA-graph key holds), the bound
sum over sites of (#src // q + 1), resident memory (RSS) after loading,
after every generation and at its peak, and the step times. The load
average is read before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SIGMAS = (0.0, 1.0, 2.0, 3.0, 1.5, 4.0, 0.5, 2.5)
"""Blur widths (latent pixels) of the start latents, cycled by generation (0: white noise)."""
GUIDANCE = 7.5


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unavailable"


def _machine() -> dict[str, Any]:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"cpu": model, "logical_cpus": os.cpu_count(), "mem_total_gib": mem, "python": platform.python_version()}


# -- the child: one runtime, one q --------------------------------------------------------------------------------
def _rss_gib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _start_latents(shape: tuple[int, ...], seed: int, sigma: float):
    import torch

    from catome_export.latents import blur

    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if sigma > 0:
        x = blur(x, sigma)
    return (x - x.mean(dim=(-2, -1), keepdim=True)) / x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)


def child(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from catome_export.engine.manifest import Manifest
    from catome_export.models.pipeline import make_scheduler
    from catome_export.runtime import Runtime

    torch.set_num_threads(args.threads)
    out = sys.stdout
    sys.stdout = sys.stderr  # only the protocol's JSON lines go to the parent
    manifest = Manifest.load(args.engine, check_files=False)
    settings = dataclasses.replace(manifest.merge, r_multiple=args.q)
    start = time.perf_counter()
    runtime = Runtime.load(args.engine, backend="ort-cpu", device="cpu", settings=settings, feature_cache=None,
                           backend_options={"intra_op_threads": args.threads})
    shapes = manifest.shapes
    batch = 2
    hw = (shapes.opt_height, shapes.opt_width)
    sites = {site.index: site.grid(hw) for site in runtime.sites.values()}
    ready = {"ready": True, "q": args.q, "load_s": round(time.perf_counter() - start, 2),
             "rss_loaded_gib": round(_rss_gib(), 3), "latent_hw": list(hw), "batch": batch,
             "settings": settings.to_dict(), "sites": {str(k): list(v) for k, v in sites.items()}}
    print(json.dumps(ready), file=out, flush=True)
    text_len, text_dim = shapes.opt_text_len, shapes.text_dim
    for line in sys.stdin:
        order = json.loads(line)
        if order.get("stop"):
            break
        g = int(order["generation"])
        seed = args.seed + 1000 * g
        sigma = args.sigmas[g % len(args.sigmas)]
        latents = _start_latents((1, runtime.unet.in_channels, *hw), seed, sigma)
        gen = torch.Generator().manual_seed(seed + 1)
        ehs = torch.randn(batch, text_len, text_dim, generator=gen)  # [empty prompt, prompt]
        scheduler = make_scheduler("ddim")
        scheduler.set_timesteps(args.steps)
        latents = latents * scheduler.init_noise_sigma
        runtime.reset()
        steps: list[dict[str, Any]] = []
        started = time.perf_counter()
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                runtime.set_step(i)
                model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                tick = time.perf_counter()
                noise = runtime.unet(model_in, t, encoder_hidden_states=ehs).sample
                ms = (time.perf_counter() - tick) * 1e3
                uncond, cond = noise.chunk(2)
                latents = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, latents).prev_sample
                record = runtime.history[-1]
                steps.append({"ms": round(ms, 2), "merged": {str(k): int(v) for k, v in sorted(record.merged.items())},
                              "matched": sorted(int(k) for k, v in record.matched.items() if v)})
        runtime.release()
        done = {"generation": g, "seed": seed, "sigma": sigma, "seconds": round(time.perf_counter() - started, 3),
                "steps": steps, "rss_gib": round(_rss_gib(), 3), "peak_rss_gib": round(_peak_gib(), 3),
                "finite": bool(torch.isfinite(latents).all())}
        print(json.dumps(done), file=out, flush=True)
    runtime.close()
    return 0


# -- the parent ---------------------------------------------------------------------------------------------------
class Child:
    def __init__(self, args: argparse.Namespace, q: int) -> None:
        sigmas = ",".join(f"{s:g}" for s in args.sigmas)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--engine", str(args.engine), "--q", str(q),
               "--steps", str(args.steps), "--threads", str(args.threads), "--seed", str(args.seed),
               "--sigmas", sigmas]
        self.q = q
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._read()
        self.generations: list[dict[str, Any]] = []
        self.spent_s = 0.0

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the q={self.q} child stopped (exit {self.proc.wait()}): see its output above")
        return json.loads(line)

    def run(self, generation: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"generation": generation}) + "\n")
        self.proc.stdin.flush()
        result = self._read()
        self.generations.append(result)
        self.spent_s += result["seconds"]
        return result

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"stop": True}) + "\n")
        self.proc.stdin.flush()
        self.proc.wait()


def summarise(child: Child) -> dict[str, Any]:
    ready = child.ready
    q = child.q
    site_shapes: set[tuple[int, int]] = set()
    tuples: set[tuple[int, ...]] = set()
    per_site: dict[str, set[int]] = {}
    times: list[float] = []
    for gen in child.generations:
        for step in gen["steps"]:
            merged = step["merged"]
            times.append(step["ms"])
            tuples.add(tuple(merged[k] for k in sorted(merged, key=int)))
            for k, r in merged.items():
                site_shapes.add((int(k), r))
                per_site.setdefault(k, set()).add(r)
    stride = tuple(ready["settings"]["stride"])
    bound = 0
    tokens = 0
    for h, w in ready["sites"].values():
        num_src = h * w - (h // stride[0]) * (w // stride[1])
        bound += num_src // q + 1
        tokens += h * w
    rss = [g["rss_gib"] for g in child.generations]
    return {
        "r_multiple": q, "generations": len(child.generations),
        "steps_per_generation": len(child.generations[0]["steps"]) if child.generations else 0,
        "unet_calls": len(times), "distinct_site_r_shapes": len(site_shapes),
        "distinct_r_per_site": {k: len(v) for k, v in sorted(per_site.items(), key=lambda kv: int(kv[0]))},
        "distinct_r_tuples": len(tuples), "bound_sum_src_over_q_plus_1": bound, "tokens_over_q": tokens / q,
        "r_range_per_site": {k: [min(v), max(v)] for k, v in sorted(per_site.items(), key=lambda kv: int(kv[0]))},
        "rss_loaded_gib": ready["rss_loaded_gib"], "rss_after_first_generation_gib": rss[0] if rss else None,
        "rss_end_gib": rss[-1] if rss else None, "rss_max_gib": max(rss) if rss else None,
        "peak_rss_gib": child.generations[-1]["peak_rss_gib"] if child.generations else None,
        "rss_per_generation_gib": rss,
        "step_ms_mean": round(statistics.fmean(times), 2) if times else None,
        "step_ms_median": round(statistics.median(times), 2) if times else None,
        "seconds_in_generations": round(child.spent_s, 1), "load_s": ready["load_s"],
        "all_finite": all(g["finite"] for g in child.generations),
        "settings": ready["settings"],
    }


def markdown(result: dict[str, Any]) -> str:
    rows = result["results"]
    lines = [f"# Shape variety with r_multiple: {result['label']}", "",
             f"Engine `{result['engine']}` ({result['model']}, latent {result['latent_hw'][0]}x{result['latent_hw'][1]}, "
             f"batch {result['batch']} with CFG), ONNX Runtime CPU, arena on (defaults), {result['threads']} threads; "
             f"{result['mode']}. Generations: DDIM, {result['steps']} steps, merge settings of the engine "
             f"({rows[0]['settings']['threshold']} threshold, schedule {rows[0]['settings']['schedule']['name']}), "
             "a different seed and start-latent blur per generation, random text embeddings.", "",
             "| q | generations x steps | distinct (site, r) | bound sum(#src//q+1) | distinct r tuples | "
             "RSS loaded | RSS after gen 1 | RSS at end | peak RSS | mean step | median step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['r_multiple']} | {r['generations']} x {r['steps_per_generation']} | "
                     f"{r['distinct_site_r_shapes']} | {r['bound_sum_src_over_q_plus_1']} | {r['distinct_r_tuples']} | "
                     f"{r['rss_loaded_gib']:.2f} GiB | {r['rss_after_first_generation_gib']:.2f} GiB | "
                     f"{r['rss_end_gib']:.2f} GiB | {r['peak_rss_gib']:.2f} GiB | {r['step_ms_mean']:.1f} ms | "
                     f"{r['step_ms_median']:.1f} ms |")
    lines += ["", "Distinct r per site: " + "; ".join(
        f"q={r['r_multiple']}: {r['distinct_r_per_site']}" for r in rows), "",
        f"Load average before: `{result['loadavg_before']}`; after: `{result['loadavg_after']}` "
        f"({result['machine']['logical_cpus']} logical CPUs, {result['machine']['cpu']}). The machine was shared "
        "with other work while this ran, so the step times are secondary; the shape counts do not depend on the "
        "load, and the memory figures only on what this process allocated.", ""]
    if result.get("notes"):
        lines += [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True, type=Path, help="engine folder (catome-export build)")
    p.add_argument("--r-multiples", default="1,64", help="comma-separated q values (default 1,64)")
    p.add_argument("--generations", type=int, default=20, help="generations per q (default 20)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps per generation (default 50)")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="stop giving a q generations after this many seconds of them (default 0: no limit)")
    p.add_argument("--sequential", action="store_true", help="one child after the other (default: interleaved)")
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads per child (default 2)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--sigmas", default=",".join(f"{s:g}" for s in SIGMAS),
                   help="blur widths of the start latents, cycled by generation; 0 is white noise, which merges "
                        "little with random weights (default %(default)s)")
    p.add_argument("--label", default=None, help="title of the .md (default: the engine folder's name)")
    p.add_argument("--json", type=Path, default=None, help="result JSON (default: none)")
    p.add_argument("--md", type=Path, default=None, help="short markdown summary (default: none)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--q", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    sigmas = args.sigmas
    args.sigmas = [float(v) for v in sigmas.split(",") if v.strip()]
    if args.child:
        return child(args)
    qs = [int(v) for v in args.r_multiples.split(",") if v.strip()]
    if not qs or any(q < 1 for q in qs) or args.generations < 1 or args.steps < 1:
        raise SystemExit("give q values >= 1, --generations >= 1 and --steps >= 1")
    before = _loadavg()
    started = time.time()
    children: list[Child] = []

    def over(c: Child) -> bool:
        return bool(args.budget_s) and c.spent_s >= args.budget_s

    if args.sequential:
        for q in qs:
            c = Child(args, q)
            for g in range(args.generations):
                if over(c):
                    break
                res = c.run(g)
                print(f"q={q} generation {g}: {res['seconds']:.1f} s, RSS {res['rss_gib']:.2f} GiB", file=sys.stderr)
            c.stop()
            children.append(c)
    else:
        children = [Child(args, q) for q in qs]
        for g in range(args.generations):
            turn = children[g % len(children):] + children[:g % len(children)]  # rotate who goes first
            for c in turn:
                if not over(c):
                    res = c.run(g)
                    print(f"q={c.q} generation {g}: {res['seconds']:.1f} s, RSS {res['rss_gib']:.2f} GiB",
                          file=sys.stderr, flush=True)
            if all(over(c) for c in children):
                break
        for c in children:
            c.stop()
    after = _loadavg()
    from catome_export.engine.manifest import Manifest

    manifest = Manifest.load(args.engine, check_files=False)
    first = children[0].ready
    result = {
        "label": args.label or args.engine.name, "engine": str(args.engine), "model": manifest.model.id,
        "weights": manifest.model.weights, "latent_hw": first["latent_hw"], "batch": first["batch"],
        "steps": args.steps, "generations_asked": args.generations, "budget_s": args.budget_s,
        "threads": args.threads, "sigmas": args.sigmas, "backend": "ort-cpu", "ort_options": "defaults (cpu_mem_arena on, shared arena)",
        "mode": "sequential (one child after the other)" if args.sequential else
                "interleaved (both children loaded, one generation each in turn)",
        "loadavg_before": before, "loadavg_after": after, "wall_s": round(time.time() - started, 1),
        "machine": _machine(), "shared_machine": True,
        "results": [summarise(c) for c in children],
        "generations": {str(c.q): [{k: v for k, v in g.items()} for g in c.generations] for c in children},
    }
    text = markdown(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.md:
        args.md.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
