#!/usr/bin/env bash
# llama.cpp's llama-bench and llama-mtmd-cli for this machine, from the llama.cpp that llama-cpp-python VERSION
# vendors (the same llama.cpp the gguf runtime runs), for the slow tests of `--llama-bin`. A phone would get the same
# tools built with the Android NDK. Static, AVX2 x86-64 (see the Makefile for why not -march=native).
# Usage: tests/llama_tools.sh DEST VERSION
set -euo pipefail
dest=$1
version=$2
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
cmake -S "$work"/llama_cpp_python-*/vendor/llama.cpp -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
cmake --build "$work/build" --target llama-bench llama-mtmd-cli -j "$(nproc)" >/dev/null
mkdir -p "$dest"
cp "$work"/build/bin/llama-bench "$work"/build/bin/llama-mtmd-cli "$dest"/
