"""LoRA and QLoRA: train.py's adapter flags (TRL's names), the adapter it wraps around the model. Loading an
adapter folder back onto its base is checkpoints/adapters.py's.

    python train.py --use_peft True --learning_rate 2e-4 --output_dir out/lora          # LoRA on every linear layer
    python train.py --use_peft True --load_in_4bit True --output_dir out/qlora          # QLoRA: NF4 base
    python inference.py --model_name_or_path out/lora --instruction "Name three primary colours."
    python weight_diff.py merge_lora --path_raw BASE --path_adapter out/lora --path_tuned out/merged

The special tokens train.py adds ([PAD] and friends) get new embedding and lm_head rows. Those rows are trained with
peft's trainable tokens and saved in the adapter (a few rows, not the whole table), so the untouched base, given the
same rows by special_tokens.smart_tokenizer_and_embedding_resize, plus the adapter is the trained model.
"""

import logging
import os
from dataclasses import dataclass, field, fields
from functools import partial

import torch
import transformers

from alpaca_trainml import precision
from alpaca_trainml.checkpoints.adapters import base_name
from alpaca_trainml.cli import UsageError

logger = logging.getLogger(__name__)
# bitsandbytes on an AVX512-BF16 CPU tries to fetch an optional kernel from the hub at import and warns "pip install
# kernels" when it cannot; its own CPU path works without it, so the warning only confuses (and we run offline).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@dataclass
class LoraArguments:
    use_peft: bool = field(
        default=False, metadata={"help": "Train a LoRA adapter instead of every weight; the base stays as it is."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scale numerator: updates are scaled by alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch's input."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "Layers that get adapters: all-linear (every linear layer but lm_head) or a comma list."},
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: load the base in 4-bit NF4 (double quantization); needs --use_peft."}
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base in 8-bit; needs --use_peft."})


LORA_DEFAULTS = {f.name: f.default for f in fields(LoraArguments)}


def target_modules(args):
    """'all-linear' stays peft's keyword; 'q_proj, v_proj' becomes ['q_proj', 'v_proj']."""
    if args.lora_target_modules.strip() == "all-linear":
        return "all-linear"
    return [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]


def check_args(args, training_args):
    """Refuse combinations that cannot work, all at once, before anything loads (args: the LoraArguments fields)."""
    problems = []
    if args.load_in_4bit and args.load_in_8bit:
        problems.append("--load_in_4bit and --load_in_8bit exclude each other; pick one")
    kbit = "--load_in_4bit" if args.load_in_4bit else "--load_in_8bit" if args.load_in_8bit else None
    if not args.use_peft:
        given = [f"--{k}" for k in LORA_DEFAULTS if k != "use_peft" and getattr(args, k) != LORA_DEFAULTS[k]]
        if given:  # a quantized base cannot be fine-tuned itself, and LoRA settings alone would be silently ignored
            problems.append(f"{', '.join(given)} need(s) --use_peft True (they set up the LoRA adapter)")
        return _raise(problems)
    if args.lora_r < 1:
        problems.append(f"--lora_r must be at least 1, got {args.lora_r}")
    if args.lora_alpha <= 0:
        problems.append(f"--lora_alpha must be above 0, got {args.lora_alpha}")
    if not 0 <= args.lora_dropout < 1:
        problems.append(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if not target_modules(args):
        problems.append("--lora_target_modules is empty; give all-linear or a comma list such as q_proj,v_proj")
    if kbit and (training_args.deepspeed or training_args.fsdp):
        launcher = "--deepspeed" if training_args.deepspeed else "--fsdp"
        problems.append(f"{kbit} with {launcher} is not supported here; drop {launcher} (one GPU, or torchrun DDP)")
    if kbit and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        problems.append(f"{kbit} runs in a single process on CPU; launch with python, not deepspeed/torchrun")
    for needed, package in ((True, "peft"), (bool(kbit), "bitsandbytes")):
        if needed and not _installed(package):
            problems.append(f"--use_peft needs the package {package}: pip install -r requirements.txt")
    _raise(problems)


def _raise(problems):
    if problems:
        raise UsageError("; ".join(problems))


def _installed(package):
    import importlib.util

    return importlib.util.find_spec(package) is not None


def load_kwargs(args):
    """Extra from_pretrained arguments for a quantized base: {} without --load_in_4bit/--load_in_8bit."""
    if not (args.load_in_4bit or args.load_in_8bit):
        return {}
    cuda = torch.cuda.is_available()
    if args.load_in_8bit:
        config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        # precision's default rule: bf16 matmuls where the GPU has them (else fp16); fp32 on CPU, where bf16 would
        # only add rounding
        compute = precision.resolve_dtype(None, "cuda" if cuda else "cpu")
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,  # the QLoRA paper's: quantize the block scales too (0.37 bit/param less)
            bnb_4bit_compute_dtype=compute,
        )
    # bitsandbytes quantizes as weights land on their device: each rank's whole model on its own GPU
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    return dict(quantization_config=config, device_map={"": device})


def add_adapters(model, args, training_args, new_token_ids):
    """Wrap a loaded (and resized) model in a LoRA adapter; new_token_ids: the rows train.py added, trained too."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if args.load_in_4bit or args.load_in_8bit:
        # casts norms to fp32, freezes the base, and makes checkpointed layers see inputs that require grad
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=training_args.gradient_checkpointing,
            gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs,
        )
    elif training_args.gradient_checkpointing:
        model.enable_input_require_grads()  # else the frozen embeddings give checkpointed layers no grad to carry
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target_modules(args),
        trainable_token_indices=token_rows(model, new_token_ids),
        task_type="CAUSAL_LM",
    )
    transformers.set_seed(training_args.seed)  # lora_A starts random: --seed makes a run repeatable (and resumable)
    model = get_peft_model(model, config)
    # the name the user gave: "embedded:smollm2-135m" loads on any machine, its converted cache folder may not
    model.peft_config["default"].base_model_name_or_path = base_name(args.model_name_or_path)
    # Trainer saves with peft's default, which stores the whole embedding and lm_head of a resized vocab. The adapter's
    # trainable tokens already hold the new rows: save only them (megabytes, not a second copy of the tables).
    model.save_pretrained = partial(model.save_pretrained, save_embedding_layers=False)
    if training_args.label_names is None:
        training_args.label_names = ["labels"]  # the Trainer cannot read them off a PeftModel: eval_loss would be None
    trainable, total = model.get_nb_trainable_parameters()
    if training_args.process_index == 0:
        logger.info(
            "LoRA r=%d: %d of %d parameters trainable (%.2f%%)", args.lora_r, trainable, total, 100 * trainable / total
        )
    return model


def token_rows(model, new_token_ids):
    """peft's trainable_token_indices for the rows train.py added: None when it added none."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not new_token_ids:
        return None
    if not torch.cuda.is_available() and is_deepspeed_zero3_enabled():
        raise UsageError(  # peft 0.21 gathers the partitioned embedding rows with torch.cuda
            f"--use_peft under ZeRO-3 cannot train the {len(new_token_ids)} new special-token rows without a GPU; "
            "use ZeRO-2 (ds_config_zero2_offload.json) or --fsdp on CPU"
        )
    tokens = {"embed_tokens": list(new_token_ids)}
    # lm_head tied to the embeddings (SmolLM2) follows the embedding rows; an untied one gets its own rows
    if not model.config.get_text_config().tie_word_embeddings:
        tokens["lm_head"] = list(new_token_ids)
    return tokens
