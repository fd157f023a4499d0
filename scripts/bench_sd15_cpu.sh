#!/usr/bin/env bash
# The committed CPU benchmark of the SD 1.5 architecture: 512x512, batch 2 (one image with CFG), fp32,
# ONNX Runtime CPU, seeded random weights (speed does not depend on the weights; no download needed).
#
# Builds (once, then reuses) the staged engine and the unstaged whole-U-Net graph under $WORKDIR
# (about 14 GB of ONNX with ONNX Runtime's fused copies; keep it outside the repository), times eager
# PyTorch, eager CA-ToMe, the staged engine and the unstaged graph on ONNX Runtime's fused graphs
# (--ort-optimize on), and the staged engine on the standard graphs (engine-unfused: the fusions' effect
# in the same run), at merge fractions 0, 0.5 and 0.75 in 3 interleaved rounds (all loaded at once),
# profiles the ONNX Runtime graphs per stage and operator type, and writes
# benchmarks/results/sd15_cpu_512_b2.{json,png,md}. Without engine-unfused, and with the graphs already
# built, it took 12-16 minutes on 2 cores; engine-unfused adds three rows (about a third more), and a
# first run (or an engine built before the fused graphs existed) builds the engine before (about 10 min).
#
# ONNX Runtime runs with its default CPU memory settings: one shared arena for every session in the
# process (all stages and the unstaged graph). Per-session arenas took the engine process to 14.4 GiB
# resident at this shape, and no arena made each step about 2x slower (3.2 million minor page faults
# per call); the shared arena is no slower than per-session ones at 5.85 GiB (scripts/bench_ort_memory.py).
#
# At 1024 px (16384 tokens at the top level, where merging pays most), batch 1 and the engine and eager
# only: RESOLUTION=1024 BATCH=1 BACKENDS=eager,engine scripts/bench_sd15_cpu.sh (writes
# sd15_cpu_1024_b1.*; the engine built for 512 px does not cover 1024, so a second one is built, in its own
# work folder).
#
# usage: [RESOLUTION=512] [BATCH=2] [BACKENDS=...] [WORKDIR=...] [OUT=...] scripts/bench_sd15_cpu.sh
#        [extra catome-export bench flags, e.g. --threads 1]
set -euo pipefail

cd "$(dirname "$0")/.."
RESOLUTION="${RESOLUTION:-512}"
# one work folder per resolution: an engine built for one size range is rebuilt, not reused, for another
WORKDIR="${WORKDIR:-${TMPDIR:-/tmp}/catome-bench$([ "$RESOLUTION" = 512 ] || echo "-$RESOLUTION")}"
BATCH="${BATCH:-2}"
OUT="${OUT:-benchmarks/results/sd15_cpu_${RESOLUTION}_b${BATCH}}"

catome-export bench \
  --model sd15 --weights random --precision fp32 --device cpu \
  --resolution "$RESOLUTION" --batch "$BATCH" \
  --backends "${BACKENDS:-eager,eager-catome,engine,engine-unstaged,engine-unfused}" \
  --ort-optimize on \
  --merge-fractions 0,0.5,0.75 \
  --repeats 3 --warmup 1 \
  --backend ort \
  --workdir "$WORKDIR" \
  --profile "$WORKDIR/profile" \
  --json "$OUT.json" --plot "$OUT.png" \
  "$@" | tee "$OUT.md"
