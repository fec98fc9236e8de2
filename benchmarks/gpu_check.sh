#!/usr/bin/env bash
# GPU check of ltmdsl, in one go: NCCL sanity of `ltmdsl train --nproc` (world size 1), each budget's step
# run for real against the memory model (torch.cuda.max_memory_allocated, benchmarks/gpu_memory.py), then the
# generated Triton kernels: correctness (bf16, fp32) and timings.
#
#   bash benchmarks/gpu_check.sh [--skip-timing] [--only delta]      (the flags are gpu_check.py's)
#
# The gated delta rule is timed against flash-linear-attention's chunk_gated_delta_rule when `fla` imports
# (put its wheel, flash_linear_attention-*.whl, in .whl/), else against the runtime's torch chunked op; the
# output names the baseline.
#
# Written for an H100 with torch 2.11, Triton 3.6 and Python 3.12, no network and no lark: the package
# is staged from this checkout (the package-dir layout of pyproject.toml, copied, nothing built) and any
# wheels in a carried .whl/ folder are installed offline first. Finishes in under ~9.5 minutes (each part
# under its own timeout); results go to stdout and, when $OUT is set, to $OUT/gpu_check.txt (NCCL and
# kernels) and $OUT/gpu_memory.txt / .json.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAGE=$(mktemp -d /tmp/ltmdsl-gpu-check.XXXXXX)
trap 'rm -rf "$STAGE"' EXIT

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$STAGE/site" .whl/*.whl \
        || echo "warning: installing .whl/*.whl failed; going on without them"
fi

mkdir -p "$STAGE/pkg"
cp -r ltmdsl "$STAGE/pkg/ltmdsl"
cp -r codegen "$STAGE/pkg/ltmdsl/codegen"
cp -r runtime "$STAGE/pkg/ltmdsl/runtime"
cp -r grammar "$STAGE/pkg/ltmdsl/grammar"
export PYTHONPATH="$STAGE/pkg:$STAGE/site${PYTHONPATH:+:$PYTHONPATH}"
export LTMDSL_CACHE_DIR="$STAGE/kernels"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
# torch.distributed on the GPU: `ltmdsl train --nproc 1 --device cuda` (NCCL) against one process.
timeout ${NCCL_S:-100} "$PY" benchmarks/nccl_check.py 2>&1 | tee ${OUT:+-a "$OUT/gpu_check.txt"}
nccl=${PIPESTATUS[0]}
# the memory model against the GPU's own allocator, each budget's step run for real
timeout ${MEMORY_S:-170} "$PY" benchmarks/gpu_memory.py --time-limit $(( ${MEMORY_S:-170} - 50 ))
memory=$?
timeout ${KERNELS_S:-290} "$PY" benchmarks/gpu_check.py "$@"
status=$?
if [ $status -eq 124 ]; then
    echo "gpu_check: timed out after ${KERNELS_S:-290} s"
    if [ -n "${OUT:-}" ]; then echo "gpu_check: timed out after ${KERNELS_S:-290} s" >>"$OUT/gpu_check.txt"; fi
fi
echo "gpu_check: nccl rc $nccl, memory rc $memory, kernels rc $status"
[ $status -eq 0 ] && [ $nccl -eq 0 ] && [ $memory -eq 0 ]
