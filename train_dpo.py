"""Preference tuning (DPO) of a causal LM with TRL's DPOTrainer, on train.py's rails (model loading, LoRA/QLoRA,
DeepSpeed, FSDP, the Alpaca chat template, resume, loss.png).

    # the embedded demo model on the project's preference sample, on CPU (make demo-dpo)
    python train_dpo.py --output_dir out/dpo --learning_rate 5e-6 --beta 0.1

    # your pairs: ShareGPT (conversations + chosen + rejected) or TRL's prompt/chosen/rejected, JSON or JSONL
    python train_dpo.py --model_name_or_path out/demo --data_path prefs.json --val_set_size 50 --output_dir out/dpo

    # a LoRA adapter; the reference is the base with the adapter disabled
    python train_dpo.py --use_peft True --learning_rate 5e-5 --output_dir out/dpo-lora

    # the trainML fork's ZeRO-2 recipe works as for train.py
    deepspeed --num_gpus 4 train_dpo.py --model_name_or_path out/sft --data_path prefs.json --bf16 True \
        --output_dir out/dpo --per_device_train_batch_size 4 --gradient_accumulation_steps 4 \
        --learning_rate 5e-7 --deepspeed ds_config_zero2_offload.json --report_to none

--beta (default 0.1) sets how far the policy may move from the reference; --ref_model names another reference;
--max_length caps prompt + answer tokens. Every other DPOConfig and TrainingArguments flag is accepted: see --help.
"""

import logging

import transformers

from alpaca_trainml import cli
from alpaca_trainml.training.dpo import train_dpo

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    transformers.utils.logging.set_verbosity_warning()
    cli.run("train_dpo.py", train_dpo)
