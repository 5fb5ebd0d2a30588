# Source this first in a device-tool command (the GPU machine: Python 3.12, its own torch, no internet):
#   source benchmarks/device_setup.sh && python3 benchmarks/bench_....py
# It installs the wheels carried in .whl/ (carry: [".whl"]) into /tmp/site and puts the repository
# on the path under its import name `scf` through a folder of links (/tmp/shim/scf/<top-level folder>),
# since the checkout there is not pip-installed. NVLink multicast stays off (device README).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
fi
mkdir -p /tmp/shim/scf
for d in bus cli consumers domains ml ops producers projections; do ln -sfn "$PWD/$d" "/tmp/shim/scf/$d"; done
export PYTHONPATH=/tmp/site:/tmp/shim${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -c 'import torch, scf.ml.ebdm; print("device ready:", torch.__version__, torch.cuda.get_device_name(0))' || return 1
