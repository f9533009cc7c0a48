"""Supervised fine-tuning of a causal LM with the HF Trainer, on Alpaca rows or chats (README: Data formats).

    # the embedded demo model on the project's sample data, on CPU
    python train.py --output_dir out/demo --num_train_epochs 1

    # chats (OpenAI messages or ShareGPT conversations), loss on every assistant turn; look at the labels first
    python train.py --data_path data/sample_chat.jsonl --show_labels 2
    python train.py --data_path data/sample_chat.jsonl,data/sample_train.json --output_dir out/chat \
        --neftune_noise_alpha 5

    # LoRA (QLoRA with --load_in_4bit True): an adapter in out/lora, the base untouched; alpaca_trainml/training/lora.py
    python train.py --output_dir out/lora --use_peft True --learning_rate 2e-4

    # the trainML fork's recipe: ZeRO-2 with CPU optimizer offload on 4x24GB GPUs
    deepspeed --num_gpus 4 train.py --model_name_or_path llama-7b --data_path alpaca_data.json \
        --bf16 True --output_dir out --num_train_epochs 3 --per_device_train_batch_size 16 \
        --gradient_accumulation_steps 2 --gradient_checkpointing --evaluation_strategy "no" \
        --learning_rate 2e-5 --warmup_ratio 0.03 --lr_scheduler_type cosine --tf32 True \
        --deepspeed ds_config_zero2_offload.json --report_to none

    # the original README's FSDP recipe
    torchrun --nproc_per_node=4 train.py ... --fsdp "full_shard auto_wrap" \
        --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer

The seed's flags that today's transformers removed are accepted and mapped (see LEGACY_FLAGS).
"""

import logging

import transformers

from alpaca_trainml import cli
from alpaca_trainml.data.alpaca_labels import _tokenize_fn, preprocess
from alpaca_trainml.data.collators import DataCollatorForSupervisedDataset
from alpaca_trainml.data.dataset import SupervisedDataset, make_supervised_data_module
from alpaca_trainml.data.prompts import PROMPT_DICT
from alpaca_trainml.data.special_tokens import (
    DEFAULT_BOS_TOKEN,
    DEFAULT_EOS_TOKEN,
    DEFAULT_PAD_TOKEN,
    DEFAULT_UNK_TOKEN,
    IGNORE_INDEX,
    missing_special_tokens,
    smart_tokenizer_and_embedding_resize,
)
from alpaca_trainml.training.arguments import (
    SAMPLE_EVAL,
    SAMPLE_TRAIN,
    DataArguments,
    ModelArguments,
    TrainingArguments,
    parse_args,
)
from alpaca_trainml.training.sft import SupervisedTrainer, load_model_and_tokenizer, train

# What the original train.py defined, importable from train as before (the machinery lives in alpaca_trainml).
__all__ = ["IGNORE_INDEX", "DEFAULT_PAD_TOKEN", "DEFAULT_EOS_TOKEN", "DEFAULT_BOS_TOKEN", "DEFAULT_UNK_TOKEN"]
__all__ += ["PROMPT_DICT", "ModelArguments", "DataArguments", "TrainingArguments", "SupervisedDataset"]
__all__ += ["smart_tokenizer_and_embedding_resize", "_tokenize_fn", "preprocess", "DataCollatorForSupervisedDataset"]
__all__ += ["make_supervised_data_module", "train"]
__all__ += ["missing_special_tokens", "parse_args", "load_model_and_tokenizer", "SupervisedTrainer"]
__all__ += ["SAMPLE_TRAIN", "SAMPLE_EVAL"]

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    transformers.utils.logging.set_verbosity_warning()
    cli.run("train.py", train)
