#!/usr/bin/env bash
# Every GPU check and benchmark in one bounded run, most important first, for a short lease on a
# GPU machine that has torch and triton installed (run from the repository root):
#
#     OUT=/tmp/gpu bash benchmarks/gpu_session.sh [part ...]     # parts: kernels kernel_tests semu runtime sweep memprobe
#
# Liger-Kernel is taken from wheels in .whl/ when that folder exists (the machine may be offline).
# Each part has its own time limit, writes its log and JSON under $OUT, and prints its last lines.
set -u
OUT=${OUT:-/tmp/dipc-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

part() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name rc=$? in $((SECONDS - t0))s"
    tail -n "${TAIL:-22}" "$OUT/$name.log"
}

parts=${*:-kernels kernel_tests semu runtime}
for p in $parts; do
    case $p in
        kernels) part kernels 120 python3 benchmarks/kernels.py --out "$OUT/kernels.json" ;;
        kernel_tests) part kernel_tests 60 python3 -m pytest -q -x -p no:cacheprovider \
            tests/kernels/test_kernels.py tests/kernels/test_kernel_inputs.py ;;
        runtime) part runtime 70 python3 benchmarks/runtime_gpu.py --out "$OUT/runtime_gpu.json" ;;
        semu) part semu 200 python3 benchmarks/semu_accuracy.py --device cuda --quick \
            --out "$OUT/semu_accuracy_gpu.json" ;;
        memprobe) part memprobe 90 python3 benchmarks/semu_memory_probe.py --device cuda \
            --out "$OUT/semu_memory_probe_gpu.json" ;;
        sweep) part sweep 200 python3 benchmarks/kernel_sweep.py --out "$OUT/kernel_sweep.json" ;;
        *) echo "unknown part $p" ;;
    esac
done
