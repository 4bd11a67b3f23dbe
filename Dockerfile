# CPU image (default):   docker build -t appliance .
# NVIDIA GPU image:      docker build -t appliance:cuda --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04 --build-arg BACKEND=cuda .
# Run it with no network at all; models and the database are volumes:
#   docker run --rm --network none -v "$PWD/models:/work/models:ro" -v "$PWD/data:/data" appliance models list
#
# The build runs the same scripts/install.sh as the README and CI, so llama.cpp is compiled inside the
# image for the build machine's CPU (GGML_NATIVE=OFF plus the SIMD flags it reports, never AMX). To target
# other CPUs pass e.g. --build-arg CMAKE_ARGS="-DGGML_AVX512=OFF".
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG BACKEND=cpu
ARG CMAKE_ARGS=""
ARG APPLIANCE_EXTRAS=demo
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git python3 python3-venv python3-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY appliance ./appliance
COPY scripts ./scripts
COPY prompts ./prompts
RUN CMAKE_ARGS="${CMAKE_ARGS}" APPLIANCE_EXTRAS="${APPLIANCE_EXTRAS}" scripts/install.sh --${BACKEND} \
 && rm -rf /root/.cache/pip

# Models under /work/models are found without `models add`; the database lives on the /data volume.
ENV APPLIANCE_DB=/data/appliance.db PATH=/app/.venv/bin:$PATH
WORKDIR /work
RUN mkdir -p /work/models /data && cp -r /app/prompts /work/prompts
VOLUME ["/work/models", "/data"]
ENTRYPOINT ["appliance"]
CMD ["--help"]
