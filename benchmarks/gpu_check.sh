#!/usr/bin/env bash
# GPU check of ltmdsl's generated Triton kernels, in one go: correctness (bf16, fp32), then timings.
#
#   bash benchmarks/gpu_check.sh [--skip-timing] [--only delta]
#
# The gated delta rule is timed against flash-linear-attention's chunk_gated_delta_rule when `fla` imports
# (put its wheel, flash_linear_attention-*.whl, in .whl/), else against the runtime's torch chunked op; the
# output names the baseline.
#
# Written for an H100 with torch 2.11, Triton 3.6 and Python 3.12, no network and no lark: the package
# is staged from this checkout (the package-dir layout of pyproject.toml, copied, nothing built) and any
# wheels in a carried .whl/ folder are installed offline first. Finishes in under ~6 minutes; results go
# to stdout and, when $OUT is set, to $OUT/gpu_check.txt.
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
timeout 340 "$PY" benchmarks/gpu_check.py "$@"
status=$?
if [ $status -eq 124 ]; then
    echo "gpu_check: timed out after 340 s"
    if [ -n "${OUT:-}" ]; then echo "gpu_check: timed out after 340 s" >>"$OUT/gpu_check.txt"; fi
fi
# torch.distributed on the GPU: `ltmdsl train --nproc 1 --device cuda` (NCCL) against one process.
timeout 120 "$PY" benchmarks/nccl_check.py | tee ${OUT:+-a "$OUT/gpu_check.txt"}
exit $status
