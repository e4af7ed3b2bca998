#!/usr/bin/env bash
# The GPU check: one command on a machine with one CUDA GPU and no network, from a copy of the repository
# plus .gpu-kit/ (bench/gpu/make_kit.sh). Results, as JSON and logs, go to the folder given (default
# bench/results/gpu-check); each step runs under its own time limit, and a failed step does not stop the next.
#   bash bench/gpu/check.sh [OUT]
set -u
cd "$(dirname "$0")/../.."
OUT=${1:-bench/results/gpu-check}
KIT=${GPU_KIT:-.gpu-kit}
VENV=${GPU_VENV:-/tmp/baton-gpu-venv}
mkdir -p "$OUT"
START=$(date +%s)

# The image's Python keeps its torch and triton; the kit adds what it lacks; Baton itself without deps.
# A GPU_VENV that exists already is used as it is (a dry run of the CPU-side parts: GPU_VENV=.venv).
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv --system-site-packages --without-pip "$VENV"  # pip, setuptools: the image's
    # The image's python3 may itself be a virtualenv (it was: /opt/torch/.venv), whose packages (torch, triton)
    # --system-site-packages does not reach: a .pth file puts its site folders after the new one's own, so the
    # kit's wheels, installed here whatever the image has (--ignore-installed), come first.
    for kind in purelib platlib; do
        image=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['$kind'])")
        mine=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['$kind'])")
        [ "$image" != "$mine" ] && echo "$image" >> "$mine/image-site-$kind.pth"
    done
    wheels=(aetcd grpcio grpcio-health-checking grpcio-reflection protobuf)
    ls "$KIT"/wheels/prometheus_client-*.whl > /dev/null 2>&1 && wheels+=(prometheus_client)
    { "$VENV/bin/python" -m pip install -q --no-index --ignore-installed --no-deps --find-links "$KIT/wheels" \
        "${wheels[@]}"
      "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-build-isolation -e .
      "$VENV/bin/python" -c "import torch, grpc, grpc_health, aetcd, baton; print('installed: grpcio', grpc.__version__)"
    } > "$OUT/install.log" 2>&1
fi
export PATH="$PWD/$KIT/bin:$VENV/bin:$PATH"
PY="$VENV/bin/python"
DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" 2>&1)
{ echo "$DEVICE"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
  "$PY" -c "import torch, triton, transformers, grpc, google.protobuf as pb; print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, \
'grpcio', grpc.__version__, 'protobuf', pb.__version__)"; } > "$OUT/stack.txt" 2>&1

STEPS=()
step() {  # step NAME SECONDS COMMAND...: runs it, logs it, records its status and time
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    STEPS+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}")
    echo "$name: rc=$rc ($(( $(date +%s) - t0 )) s)"
}
step gpu_tests 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_gpu.py tests/test_engine_kernels.py --junitxml "$OUT/gpu_tests.xml"
step kernel_tests 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py --junitxml "$OUT/kernel_tests.xml"
step bench_kernels 60 "$PY" bench/kernel_speed.py --quick --json "$OUT/kernels.json"
step engine_cuda 150 "$PY" bench/engine_cuda.py --json "$OUT/engine_cuda.json"

{ echo "{\"device\": \"$DEVICE\", \"commit\": \"$(git rev-parse --short HEAD 2>/dev/null)\","
  echo " \"total_seconds\": $(( $(date +%s) - START )), \"steps\": ["
  ( IFS=,; echo "  ${STEPS[*]}" )
  echo "]}"; } > "$OUT/summary.json"
cat "$OUT/summary.json"
