#!/usr/bin/env bash
# llama.cpp, built from source, for tests/benchmarks/bench_cpu_peer.py (the CPU peer: GGUF at BF16 / Q8_0 / Q4_0).
# Reproducible from the package index alone (minutes on 2 cores): the source distribution of llama-cpp-python
# vendors llama.cpp; this builds its llama-bench, llama-quantize and llama-mtmd-cli with the local compiler for this
# CPU (GGML_NATIVE), and leaves DIR/llama.cpp pointing at the tree (convert_hf_to_gguf.py and gguf-py inside).
#     bash tests/llama_cpp_env.sh [DIR]       # default: $QVA_LLAMA_CPP, else ../llama-cpp beside the repository
# Never a dependency of qva: the benchmark runs the converter in qva's test venv (torch, transformers) with gguf-py and
# llama.cpp/pydeps (sentencepiece) on PYTHONPATH, and the binaries as programs.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-${QVA_LLAMA_CPP:-$(dirname "$repo")/llama-cpp}}"
version="0.3.36"  # llama-cpp-python's sdist; its vendor/llama.cpp is the llama.cpp measured
mkdir -p "$dest"
cd "$dest"
if [[ ! -x llama.cpp/build/bin/llama-bench ]]; then
    [[ -f "llama_cpp_python-$version.tar.gz" ]] || python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d .
    [[ -d "llama_cpp_python-$version" ]] || tar xzf "llama_cpp_python-$version.tar.gz"
    ln -sfn "llama_cpp_python-$version/vendor/llama.cpp" llama.cpp
    # this CPU's instruction sets (GGML_NATIVE), except AMX: on the AMX Xeon measured (a VM) ggml's AMX tile kernels
    # die with SIGILL at their first tileloadd, so an AMX CPU gets its AVX-512 / VNNI / BF16 flags named instead
    isa=(-DGGML_NATIVE=ON)
    if grep -q amx_tile /proc/cpuinfo; then
        isa=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON
             -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON
             -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
    fi
    cmake -S llama.cpp -B llama.cpp/build -DCMAKE_BUILD_TYPE=Release "${isa[@]}" -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
    cmake --build llama.cpp/build -j"$(nproc)" --target llama-bench llama-quantize llama-mtmd-cli >/dev/null
fi
# the converter's one import that neither gguf-py nor qva's test venv has (beside the tree, not in any venv)
[[ -d llama.cpp/pydeps/sentencepiece ]] || python3 -m pip install -q --target llama.cpp/pydeps sentencepiece
echo "llama.cpp ready: $dest/llama.cpp"
