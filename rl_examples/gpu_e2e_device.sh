#!/usr/bin/env bash
# rl_examples/gpu_e2e.py on the offline GPU host, in one call (from the repo root):
#
#   native/offline-bundle.sh .bundle          # here, once (docs/testing.md)
#   run(carry=[".bundle"], timeout_s=420,
#       command="bash rl_examples/gpu_e2e_device.sh [gpu_e2e.py args]")
#
# Installs the bundle into a venv that also sees the host's python3 packages (torch), builds
# the native parts, checks torch + CUDA + criu, then runs the harness until DEADLINE_S
# (default 390) seconds after this script started: gpu_e2e.py gets what is left, less 40 s,
# as --budget-s (it starts no run it expects to end later) and a hard timeout. Writes
# $OUT/run.log, $OUT/gpu-e2e.json (rewritten after every run), $OUT/gpu-e2e.daemon.log.
set -x
t0=$(date +%s)
B=$PWD/.bundle
OUT=${OUT:-/tmp/gpu-e2e}; mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
    NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
uname -r; nproc; cat /proc/loadavg
host_py=$(command -v python3)  # the host's venv that holds torch
host_site=$("$host_py" -c 'import site; print(site.getsitepackages()[0])')
venv=/tmp/e2e-venv
if bash "$B/install.sh" "$venv" "$PWD"; then
    # the venv sees the host's packages too, after its own (a .pth line run at start-up)
    venv_site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "import site; site.addsitedir('$host_site')" >"$venv_site/zz-host-site.pth"
fi
if ! "$venv/bin/python" -c "import torch, grpc, structlog" 2>/dev/null; then
    echo "== the venv does not work here: the wheels into a folder on PYTHONPATH instead"
    "$host_py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/e2e-site \
        "$B"/wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/e2e-site:$PWD
    venv=$(dirname "$(dirname "$host_py")")
fi
source "$B/env.sh" "$venv"
python3 native/build.py || exit 1
python3 -c "import torch, grpc, deltabox; print('torch', torch.__version__,
            torch.cuda.is_available(), 'grpc', grpc.__version__)" || exit 1
"$DELTABOX_CRIU_PREFIX/sbin/criu" --version | head -1
echo "== setup took $(( $(date +%s) - t0 )) s"
left=$(( ${DEADLINE_S:-390} - ($(date +%s) - t0) ))
timeout -k 10 $(( left - 10 )) python3 rl_examples/gpu_e2e.py --out "$OUT/gpu-e2e.json" \
    --budget-s $(( left - 40 )) "$@"
rc=$?
echo "== gpu_e2e.py exit $rc after $(( $(date +%s) - t0 )) s"
cat /proc/loadavg
exit $rc
