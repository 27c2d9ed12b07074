#!/usr/bin/env bash
# Build llama-cpp-python (llama.cpp with its Python binding) once, from source, into a cache folder outside the
# repository, for tests/test_export_formats.py's llama.cpp check and benchmarks/bench_export.py. It compiles
# llama.cpp: minutes on two cores (about 30 on a shared 2-core machine). Nothing is installed into the
# environment; the test and the benchmark add the folder to sys.path themselves.
#
#     bash benchmarks/build_llama_cpp.sh            # into ~/.cache/gptforge/llama-cpp-python
#     GPTFORGE_LLAMA_CPP=/some/folder bash benchmarks/build_llama_cpp.sh
#
# An AVX2-only copy, for bench_export.py --isa avx2 on a processor with AVX-512 (about 5 minutes here):
#
#     GPTFORGE_LLAMA_CPP=~/.cache/gptforge/llama-cpp-python-avx2 CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON \
#       -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
#       -DLLAMA_BUILD_TESTS=OFF" bash benchmarks/build_llama_cpp.sh
#
# pip's wheel cache is bypassed (--no-cache-dir): a wheel built earlier with other CMAKE_ARGS would be reused.
set -euo pipefail
target="${GPTFORGE_LLAMA_CPP:-$HOME/.cache/gptforge/llama-cpp-python}"
python="${PYTHON:-python}"
start=$(date +%s)
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF}" \
    "$python" -m pip install --no-cache-dir --no-deps --target "$target" "llama-cpp-python==0.3.36" diskcache
echo "built llama-cpp-python into $target in $(( $(date +%s) - start )) s"
