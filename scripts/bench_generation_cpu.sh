#!/usr/bin/env bash
# Generation-mode benchmark on the CPU: whole N-step DDIM generations (default 50) of eager PyTorch, eager with the
# DeepCache package's own DeepCacheSDHelper, and the staged engine (ONNX Runtime, fused graphs) with CA-ToMe at
# merge fractions 0 and 0.75, without and with feature caching (default interval 3, branch 0), in rotated rounds;
# the mean U-Net time per step per row. Seeded random weights (speed does not depend on them).
#
# The engine is built once, cut for the feature-cache branch, under $WORKDIR (SD 1.5 at 512 px: about 7 GB and
# 12 minutes on 2 cores, its 10-step verification with caching included); pass ENGINE=DIR to use a built one.
# SD 1.5 at 512 px, batch 2: one round is about 50 minutes on 2 cores (eager alone is about 13 minutes).
#
# usage: [MODEL=sd15] [RESOLUTION=512] [BATCH=2] [STEPS=50] [ROUNDS=1] [CACHE=3,0] [ENGINE=DIR] [WORKDIR=...]
#        [OUT=...] scripts/bench_generation_cpu.sh [extra catome-export bench flags]
set -euo pipefail

cd "$(dirname "$0")/.."
MODEL="${MODEL:-sd15}"
RESOLUTION="${RESOLUTION:-512}"
BATCH="${BATCH:-2}"
STEPS="${STEPS:-50}"
ROUNDS="${ROUNDS:-1}"
CACHE="${CACHE:-3,0}"
WORKDIR="${WORKDIR:-${TMPDIR:-/tmp}/catome-bench-generation}"
ENGINE="${ENGINE:-$WORKDIR/$MODEL-$RESOLUTION-b$BATCH-fc${CACHE#*,}}"
OUT="${OUT:-benchmarks/results/${MODEL}_cpu_${RESOLUTION}_b${BATCH}_generation}"

if [ ! -f "$ENGINE/manifest.json" ]; then
  catome-export build --model "$MODEL" --weights random --precision fp32 --engine-kind ort \
    --resolution "$RESOLUTION" --batch "$BATCH" --feature-cache "$CACHE" --out "$ENGINE" >&2
fi
catome-export bench --generation "$STEPS" --rounds "$ROUNDS" --feature-cache "$CACHE" \
  --engine "$ENGINE" --model "$MODEL" --weights random --resolution "$RESOLUTION" --batch "$BATCH" \
  --device cpu --backend ort --merge-fractions 0,0.75 \
  --json "$OUT.json" "$@" | tee "$OUT.md"
