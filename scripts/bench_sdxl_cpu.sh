#!/usr/bin/env bash
# The committed CPU benchmark of the SDXL architecture: 1024x1024, batch 2 (one image with CFG), fp32,
# ONNX Runtime CPU, seeded random weights (speed does not depend on the weights; no download needed).
#
# SDXL's U-Net holds 10.3 GB of fp32 weights, in torch and as much again in the engine: on a 24 GiB machine
# the two do not fit together, so the backends are loaded one at a time (--one-at-a-time): eager PyTorch
# first, then the engine, whose rows (merge fractions 0, 0.5, 0.75) are timed in interleaved rounds. The
# ratios between merge fractions come from one interleaved run; eager against the engine compares rows
# timed minutes apart (the load average is in every row).
#
# The engine is built first, by the user's command (catome-export build, --no-verify: the same graphs
# are verified by the 512 px build in benchmarks/results/verify_sdxl_random_512_cpu.txt), into
# $WORKDIR/engine (about 21 GB of ONNX with ONNX Runtime's fused copies; keep it outside the repository),
# and reused when its manifest is there. The build takes about 10 minutes on 2 cores and peaks at about
# 21 GB of memory; at 1024 px batch 2 a U-Net call takes minutes on 2 cores.
#
# usage: [RESOLUTION=1024] [BATCH=2] [REPEATS=2] [WORKDIR=...] [OUT=...] scripts/bench_sdxl_cpu.sh
#        [extra catome-export bench flags]
set -euo pipefail

cd "$(dirname "$0")/.."
RESOLUTION="${RESOLUTION:-1024}"
BATCH="${BATCH:-2}"
WORKDIR="${WORKDIR:-${TMPDIR:-/tmp}/catome-bench-sdxl}"
OUT="${OUT:-benchmarks/results/sdxl_cpu_${RESOLUTION}_b${BATCH}}"
ENGINE="$WORKDIR/engine"

if [ ! -f "$ENGINE/manifest.json" ]; then
  catome-export build --model sdxl --weights random --precision fp32 --engine-kind ort \
    --min-resolution 512 --max-resolution "$RESOLUTION" --min-batch 1 --max-batch "$BATCH" \
    --no-verify --out "$ENGINE"
fi

catome-export bench \
  --engine "$ENGINE" --model sdxl --weights random --precision fp32 --device cpu \
  --resolution "$RESOLUTION" --batch "$BATCH" \
  --backends eager,engine --one-at-a-time \
  --ort-optimize on \
  --merge-fractions 0,0.5,0.75 \
  --repeats "${REPEATS:-2}" --warmup 1 \
  --backend ort \
  --workdir "$WORKDIR" \
  --json "$OUT.json" --plot "$OUT.png" \
  "$@" | tee "$OUT.md"
