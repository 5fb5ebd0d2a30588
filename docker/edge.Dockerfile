# syntax=docker/dockerfile:1
#
# SCF edge node agent: `scf run edge` on a small host next to the equipment it controls.
# It fetches signed artifacts from the object store, verifies digest and signature,
# swaps them in atomically, keeps history, rolls back, and reports energy.measured.
#
# No torch: the agent verifies and activates artifacts, it does not run the model. If a
# deployment's health probe has to load the model, build with the train extra:
#   docker build -f docker/edge.Dockerfile --build-arg EXTRAS=train -t scf-edge .
# (that pulls the CPU-or-CUDA torch wheel pip picks for the platform: hundreds of MB).
#
# Build from the repository root:
#   docker build -f docker/edge.Dockerfile -t scf-edge .
# Run:
#   docker run --rm -e NATS_URL=nats://edge:PASSWORD@hub:4222 -v edge-a:/var/lib/scf scf-edge run edge --node node-a

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG EXTRAS=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    SCF_HOME=/var/lib/scf

RUN --mount=type=bind,target=/src,rw \
    --mount=type=cache,target=/root/.cache/pip \
    pip install "/src${EXTRAS:+[$EXTRAS]}" \
 && scf --help > /dev/null

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/scf scf
USER scf
WORKDIR /var/lib/scf
VOLUME ["/var/lib/scf"]

ENTRYPOINT ["scf"]
CMD ["run", "edge"]
