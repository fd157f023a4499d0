#!/usr/bin/env bash
# GPU check for a machine with one NVIDIA GPU and a CUDA build of PyTorch (no TensorRT, no onnxruntime-gpu
# needed). Under 8 minutes in all (GPU_CHECK_LIMIT_S, default 450 s, caps every step):
#
#   1. installs the project and its test extra without touching the installed torch (the project pins a torch
#      release; here the machine's own CUDA build is kept: the other requirements are installed with torch
#      constrained to the installed version, the project itself with --no-deps). A failed install is recorded
#      and the checkout is used through PYTHONPATH;
#   2. runs `pytest -m gpu`;
#   3. runs scripts/gpu_check.py: eager fp16 SD 1.5 (random weights, SDPA) at 512 and 1024 px with and without
#      CA-ToMe, the torch-backend stage chain with and without CUDA graphs, and generation mode (whole DDIM
#      schedules at the first resolution: eager, eager with DeepCache-style feature caching (3,0), the stage
#      chain without and with it, unmerged and CA-ToMe-forced; summary.mean_ms is the per-step figure), every
#      call timed; and, where `tensorrt` and `polygraphy` import (their wheels carried in, see below), a
#      TensorRT fp16 build of the tiny engine, `verify` on it, and two prompts of different token lengths
#      generated through it with CUDA graphs on (part "tensorrt/tiny"; skipped with the reason otherwise);
#      it writes ONE JSON with the device description, the install and pytest results, every call's
#      milliseconds and medians.
#
# A machine that cannot reach a package index (a lent GPU machine often cannot) may lack pure-Python needs
# such as diffusers and polygraphy: download their wheels beforehand into a folder (pip download --no-deps
# --only-binary=:all: ... -d .whl NAME==VERSION) and set GPU_CHECK_WHEELS=.whl; they are then unpacked with
# --no-index --no-deps into a folder of their own and put on PYTHONPATH before anything else runs.
#
# usage: scripts/gpu_check.sh [OUT_JSON] [extra gpu_check.py flags]   (OUT_JSON default
#        benchmarks/results/gpu_check.json). Without a CUDA device it stops at once with exit code 2 and
#        writes nothing. Exit 0: everything ran; 1: some part failed (see the JSON).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu_check.json}"
[ $# -gt 0 ] && shift
LIMIT="${GPU_CHECK_LIMIT_S:-450}"
PYTHON="${PYTHON:-python}"
START=$(date +%s)

remaining() { echo $(( LIMIT - ($(date +%s) - START) )); }
cap() { local left; left=$(remaining); if [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi; }

if ! "$PYTHON" - <<'EOF'
import sys
try:
    import torch
except ImportError:
    print("gpu_check: PyTorch is not installed for this Python; install a CUDA build of PyTorch first. "
          "Nothing was written.", file=sys.stderr)
    sys.exit(2)
if not torch.cuda.is_available():
    print(f"gpu_check: no CUDA device is visible to PyTorch (torch {torch.__version__}, CUDA build "
          f"{torch.version.cuda}). Run this on a machine with an NVIDIA GPU and a CUDA build of PyTorch. "
          "Nothing was written.", file=sys.stderr)
    sys.exit(2)
EOF
then
  exit 2
fi

LOGDIR="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
  if ! compgen -G "$GPU_CHECK_WHEELS/*.whl" >/dev/null; then
    echo "gpu_check: GPU_CHECK_WHEELS=$GPU_CHECK_WHEELS holds no .whl files" >&2
    exit 2
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$LOGDIR/site" "$GPU_CHECK_WHEELS"/*.whl >"$LOGDIR/wheels.log" 2>&1 \
    || { echo "gpu_check: could not unpack the wheels in $GPU_CHECK_WHEELS; see $LOGDIR/wheels.log" >&2; exit 2; }
  export PYTHONPATH="$LOGDIR/site${PYTHONPATH:+:$PYTHONPATH}"
fi
TORCH_BEFORE="$("$PYTHON" -c 'import torch; print(torch.__version__)')"
echo "gpu_check: torch $TORCH_BEFORE; logs in $LOGDIR; limit ${LIMIT}s"

# -- 1. install (torch left as it is) ----------------------------------------------------------------------------
"$PYTHON" - >"$LOGDIR/requirements.txt" <<'EOF'
import re
from pathlib import Path

text = Path("pyproject.toml").read_text()
try:
    import tomllib
    data = tomllib.loads(text)
    reqs = list(data["project"]["dependencies"]) + list(data["project"]["optional-dependencies"]["test"])
except ImportError:  # Python 3.10: read the two lists without a TOML parser
    def block(name):
        m = re.search(rf"^{name}\s*=\s*\[(.*?)\]", text, re.S | re.M)
        return re.findall(r'"([^"]+)"', m.group(1)) if m else []
    reqs = block("dependencies") + block("test")
for r in reqs:
    if re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].strip().lower() != "torch":
        print(r)
EOF
echo "torch==$TORCH_BEFORE" >"$LOGDIR/constraints.txt"
INSTALL_RC=0
{
  timeout "$(cap 150)" "$PYTHON" -m pip install --retries 1 --timeout 15 -c "$LOGDIR/constraints.txt" \
    -r "$LOGDIR/requirements.txt" || INSTALL_RC=$?
  if [ "$INSTALL_RC" -eq 0 ]; then
    timeout "$(cap 60)" "$PYTHON" -m pip install --retries 1 --timeout 15 --no-deps --no-build-isolation -e . \
      || timeout "$(cap 60)" "$PYTHON" -m pip install --retries 1 --timeout 15 --no-deps -e . \
      || INSTALL_RC=$?
  fi
} >"$LOGDIR/install.log" 2>&1
TORCH_AFTER="$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo missing)"
if [ "$TORCH_AFTER" != "$TORCH_BEFORE" ]; then
  echo "gpu_check: the install changed torch ($TORCH_BEFORE -> $TORCH_AFTER); see $LOGDIR/install.log" >&2
  [ "$INSTALL_RC" -eq 0 ] && INSTALL_RC=1
fi
echo "gpu_check: install exit code $INSTALL_RC"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# -- 2. pytest -m gpu ------------------------------------------------------------------------------------------
PYTEST_RC=0
timeout "$(cap 120)" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests >"$LOGDIR/pytest_gpu.log" 2>&1 \
  || PYTEST_RC=$?
echo "gpu_check: pytest -m gpu exit code $PYTEST_RC ($(tail -n 1 "$LOGDIR/pytest_gpu.log"))"

# -- 3. timings into one JSON -----------------------------------------------------------------------------------
LEFT=$(remaining)
if [ "$LEFT" -lt 60 ]; then
  echo "gpu_check: only ${LEFT}s left of ${LIMIT}s; timing with what remains" >&2
fi
BUDGET=$(( LEFT > 40 ? LEFT - 30 : 10 ))
RC=0
timeout "$(( LEFT > 15 ? LEFT - 5 : 10 ))" "$PYTHON" scripts/gpu_check.py "$OUT" --budget-s "$BUDGET" \
  --install-log "$LOGDIR/install.log" --install-rc "$INSTALL_RC" \
  --pytest-log "$LOGDIR/pytest_gpu.log" --pytest-rc "$PYTEST_RC" "$@" || RC=$?
echo "gpu_check: done in $(( $(date +%s) - START ))s, timings exit code $RC, JSON $OUT"
if [ "$RC" -ne 0 ] || [ "$PYTEST_RC" -ne 0 ] || [ "$INSTALL_RC" -ne 0 ]; then
  exit 1
fi
exit 0
