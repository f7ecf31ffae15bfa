#!/usr/bin/env bash
# The GPU check in one command on a CUDA machine that has PyTorch but maybe no package index:
# installs twinvae's pure-Python dependencies from wheels/ (when that folder is there), then
# runs benchmarks/gpu_check.py with twinvae's C kernels off (no C compiler needed).
#
#     benchmarks/gpu_check.sh CACHE.npz OUT.json [more gpu_check.py options]
#
# PYTHON selects the interpreter that has the CUDA build of PyTorch (default: python3).
set -euo pipefail
if [ "$#" -lt 2 ]; then
    echo "usage: benchmarks/gpu_check.sh CACHE.npz OUT.json [gpu_check.py options]" >&2
    exit 2
fi
cache=$(realpath "$1")
out=$(realpath -m "$2")
shift 2
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ -d wheels ]; then
    "$python" -m pip install --quiet --no-index --find-links wheels/ \
        -r benchmarks/gpu_check-requirements.txt
    "$python" -m pip install --quiet --no-index --find-links wheels/ --no-deps -e .
fi
export TWINVAE_CPU_KERNELS=${TWINVAE_CPU_KERNELS:-0}
exec "$python" benchmarks/gpu_check.py --cache "$cache" --out "$out" "$@"
