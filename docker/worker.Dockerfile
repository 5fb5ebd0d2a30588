# syntax=docker/dockerfile:1
#
# SCF GPU worker: `scf run worker --pool cloud --device cuda` on a CUDA base with torch,
# plus nats-server (from the project's dependencies) for running nats/leaf.conf next to it
# on a rented GPU host.
#
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t scf-worker .
# Run (NVIDIA Container Toolkit on the host):
#   docker run --rm --gpus all -e NATS_URL=nats://127.0.0.1:4222 --network host scf-worker
#
# The base image brings Python, torch and the CUDA/cuDNN runtime. The project's `train`
# extra asks for torch>=2.2, which the image's torch satisfies, so pip keeps the CUDA
# build instead of downloading another. Change TORCH_IMAGE to move CUDA or torch; the
# check below stops the build if the image's Python is older than the project needs.

ARG TORCH_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${TORCH_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    SCF_HOME=/var/lib/scf

RUN python -c "import sys, torch; assert sys.version_info >= (3, 11), f'SCF needs Python >= 3.11; {sys.version} in this base image'; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

RUN --mount=type=bind,target=/src,rw \
    --mount=type=cache,target=/root/.cache/pip \
    pip install "/src[train]" \
 && python -c "import torch, safetensors" \
 && nats-server --version \
 && scf --help > /dev/null

COPY nats/ /etc/scf/nats/

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/scf scf
USER scf
WORKDIR /var/lib/scf
VOLUME ["/var/lib/scf"]

ENTRYPOINT ["scf"]
CMD ["run", "worker", "--pool", "cloud", "--device", "cuda"]
