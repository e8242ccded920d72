#!/usr/bin/env bash
# Install llama-cpp-python into a venv from a cached wheel, building the wheel once when needed.
#
#   tools/ensure_llama_wheel.sh [VENV]          (default: .venv)
#
# Environment:
#   LLAMA_CPP_VERSION   version to install (default 0.3.36)
#   LLAMA_CMAKE_ARGS    CMake flags for the build. Default on x86-64: -DGGML_NATIVE=OFF, which
#                       compiles for x86-64-v3 (SSE4.2, AVX, AVX2, FMA, F16C, BMI2; no AVX-512), so
#                       the cached wheel runs on any CI machine since Haswell/Zen, not only on the
#                       one that built it. Elsewhere (e.g. a Jetson): empty = native; add
#                       -DGGML_CUDA=on for GPU offload. GGML_BACKEND_DL/GGML_CPU_ALL_VARIANTS are not
#                       used: llama-cpp-python 0.3.36 neither installs the per-CPU variant libraries
#                       nor tells ggml where to find them, so such a wheel would have no CPU backend.
#   EDGE_INSPECT_CACHE  cache root (default ~/.cache/edge-inspect); wheels live in
#                       $EDGE_INSPECT_CACHE/wheels/<key>/ where key = version, CPU arch, glibc, flags.
#   BUILD_JOBS          parallel compile jobs (default 2); the build runs under `nice -n 19`.
#
# The wheel is ctypes-based (tag py3-none-linux_*), so one wheel serves every Python >= 3.8;
# the key therefore holds the platform, not the interpreter. Idempotent: a second run with the
# same key changes nothing.
set -euo pipefail

VENV="${1:-.venv}"
VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
CACHE="${EDGE_INSPECT_CACHE:-$HOME/.cache/edge-inspect}"
JOBS="${BUILD_JOBS:-2}"
ARCH="$(uname -m)"
if [[ -z "${LLAMA_CMAKE_ARGS+x}" ]]; then
    if [[ "$ARCH" == "x86_64" ]]; then LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF"; else LLAMA_CMAKE_ARGS=""; fi
fi

PY="$VENV/bin/python"
if [[ ! -x "$PY" ]]; then
    echo "ensure_llama_wheel: no python at $PY; create the venv first (python3 -m venv $VENV)" >&2
    exit 2
fi

LIBC="$("$PY" -c 'import platform; n, v = platform.libc_ver(); print((n or "libc") + (v or "unknown"))')"
FLAGS_HASH="$(printf '%s' "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)"
KEY="llama-cpp-python-${VERSION}-${ARCH}-${LIBC}-${FLAGS_HASH}"
WHEEL_DIR="$CACHE/wheels/$KEY"
MARKER_NAME=".edge-inspect-wheel-key"

installed_key() {
    "$PY" - "$MARKER_NAME" <<'EOF' 2>/dev/null || true
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llama_cpp")
if spec and spec.origin:
    marker = pathlib.Path(spec.origin).parent / sys.argv[1]
    if marker.is_file():
        print(marker.read_text().strip())
EOF
}

if [[ "$(installed_key)" == "$KEY" ]] && "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    echo "ensure_llama_wheel: llama-cpp-python $VERSION ($KEY) already installed in $VENV"
    exit 0
fi

mkdir -p "$WHEEL_DIR"
exec 9>"$WHEEL_DIR/.lock"
flock 9  # one build per key at a time; a waiting run then finds the wheel

find_wheel() { find "$WHEEL_DIR" -maxdepth 1 -name "llama_cpp_python-${VERSION}-*.whl" -print -quit; }
WHEEL="$(find_wheel)"
if [[ -z "$WHEEL" ]]; then
    echo "ensure_llama_wheel: building llama-cpp-python $VERSION with CMAKE_ARGS='$LLAMA_CMAKE_ARGS' (15-25 min on 2 cores)"
    BUILD_TMP="$(mktemp -d "$WHEEL_DIR/build.XXXXXX")"
    trap 'rm -rf "$BUILD_TMP"' EXIT
    nice -n 19 env CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" CMAKE_ARGS="$LLAMA_CMAKE_ARGS" \
        "$PY" -m pip wheel --no-deps --no-binary llama-cpp-python -w "$BUILD_TMP" "llama-cpp-python==$VERSION"
    built="$(find "$BUILD_TMP" -maxdepth 1 -name "llama_cpp_python-${VERSION}-*.whl" -print -quit)"
    if [[ -z "$built" ]]; then
        echo "ensure_llama_wheel: the build produced no wheel" >&2
        exit 1
    fi
    mv "$built" "$WHEEL_DIR/"
    printf '%s\n' "$LLAMA_CMAKE_ARGS" > "$WHEEL_DIR/cmake-args.txt"
    WHEEL="$(find_wheel)"
fi

echo "ensure_llama_wheel: installing $WHEEL into $VENV"
"$PY" -m pip install --quiet --force-reinstall --no-deps "$WHEEL"
"$PY" -m pip install --quiet "$WHEEL"  # its dependencies (numpy, jinja2, diskcache, typing-extensions)
"$PY" - "$MARKER_NAME" "$KEY" <<'EOF'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llama_cpp")
(pathlib.Path(spec.origin).parent / sys.argv[1]).write_text(sys.argv[2] + "\n")
EOF
"$PY" -c "import llama_cpp; print('ensure_llama_wheel: llama-cpp-python', llama_cpp.__version__, llama_cpp.llama_print_system_info().decode().strip())"
