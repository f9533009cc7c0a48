"""The TRL side of benchmarks/peers_training.py, run in .venv-peers (TRL 1.16); imports no alpaca_trainml.

    .venv-peers/bin/python -m benchmarks.peers_trl --work WORK --out OUT --mode padded      # one training run
    .venv-peers/bin/python -m benchmarks.peers_trl --work WORK --out OUT --leak_check        # packing isolation

WORK is the folder peers_training.py prepared: train_tokens.jsonl (input_ids and labels, exactly the examples train.py
builds, so both sides train on the same tokens and the same supervised positions) and job.json (model, batch, LR ...).
A training run writes OUT/result.json (train_runtime, supervised tokens per optimizer step, losses) and the model or
adapter to OUT/model; peers_training.py measures its peak RSS and evaluates it with the same code as ours.
"""

import argparse
import json
import time
from pathlib import Path

MODES = ("padded", "padding_free")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="the folder peers_training.py prepared")
    p.add_argument("--out", required=True, help="where this run writes result.json (and model/)")
    p.add_argument("--mode", choices=MODES, default="padded", help="TRL's collator: padded, or padding_free=True")
    p.add_argument("--config", choices=("full", "lora"), default="full")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast, as train.py's --bf16 True")
    p.add_argument("--leak_check", action="store_true", help="only check packed examples against each one alone")
    return p.parse_args()


def load_examples(work):
    with open(Path(work) / "train_tokens.jsonl") as fh:
        return [json.loads(line) for line in fh]


def load_model(job, config):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        job["model"], dtype=torch.float32, attn_implementation="sdpa"
    )
    if config == "lora":
        from peft import LoraConfig, get_peft_model

        # the seed just before the wrap, as train.py does, so lora_A starts from the same draw on both sides
        transformers.set_seed(job["seed"])
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **job["lora"]))
    return model


def leak_check(work, out):
    """Does TRL's padding-free batch (position_ids restart per example, no attention mask) keep examples apart under
    sdpa and eager attention on CPU? Each example's logits packed against alone, with the KV cache on (a plain
    forward's default) and off (as SFTTrainer trains: its compute_loss passes use_cache=False). Without a cache,
    transformers finds the packed sequences in position_ids and builds a block-diagonal mask; with one it does not."""
    import torch
    import transformers
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    job = json.loads((Path(work) / "job.json").read_text())
    examples = load_examples(work)[:3]
    collate = DataCollatorForLanguageModeling(pad_token_id=job["pad_token_id"], padding_free=True)
    packed = collate([dict(input_ids=e["input_ids"], labels=e["labels"]) for e in examples])
    inputs = {k: v for k, v in packed.items() if k != "labels"}
    model = transformers.AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
    report = {}
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            alone = [model(torch.tensor([e["input_ids"]]), use_cache=False).logits[0] for e in examples]
            for cache in (True, False):
                logits = model(**inputs, use_cache=cache).logits[0].split([len(e["input_ids"]) for e in examples])
                key = f"{impl}, use_cache={cache}"
                report[key] = max(float((p - a).abs().max()) for p, a in zip(logits, alone))
    versions = dict(transformers=transformers.__version__, trl=__import__("trl").__version__)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "leak.json").write_text(json.dumps(dict(max_logit_diff=report, **versions)))


class CountingCollator:
    """TRL's collator, counting the supervised tokens (labels != -100) of every micro-batch it makes."""

    def __init__(self, collate):
        self.collate, self.counts = collate, []

    def __call__(self, examples):
        batch = self.collate(examples)
        self.counts.append(int((batch["labels"] != -100).sum()))
        return batch


def train(work, out, mode, config, bf16=False):
    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    job = json.loads((Path(work) / "job.json").read_text())
    side = job["configs"][config]
    model = load_model(job, config)
    # input_ids + labels: TRL takes a tokenized dataset as it is (no re-tokenizing, no EOS added, labels kept)
    data = datasets.Dataset.from_list(load_examples(work))
    args = SFTConfig(
        output_dir=str(Path(out) / "checkpoints"),
        per_device_train_batch_size=job["batch_size"],
        gradient_accumulation_steps=job["grad_accum"],
        learning_rate=side["learning_rate"],
        lr_scheduler_type=job["lr_scheduler_type"],
        warmup_steps=job["warmup_steps"],
        num_train_epochs=1,
        seed=job["seed"],
        train_sampling_strategy="sequential",  # the rows in the file's (pre-shuffled) order, on both sides
        gradient_checkpointing=False,  # TRL's default is True: slower, and train.py does not checkpoint either
        padding_free=mode == "padding_free",
        max_length=None if mode == "padding_free" else job["max_length"],  # rows are already cut at max_length
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=job["dataloader_num_workers"],
        bf16=bf16,
        use_cpu=bf16 and not torch.cuda.is_available(),  # bf16 autocast on a CPU, as train.py's --bf16 True there
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data)
    trainer.data_collator = counter = CountingCollator(trainer.data_collator)
    start = time.perf_counter()
    metrics = trainer.train().metrics
    wall = time.perf_counter() - start
    trainer.save_model(str(Path(out) / "model"))
    result = dict(
        side=f"trl-{mode}",
        train_runtime=metrics["train_runtime"],
        wall_s=wall,
        micro_batch_supervised=counter.counts,
        losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
        optim=str(args.optim),
        gradient_checkpointing=args.gradient_checkpointing,
    )
    (Path(out) / "result.json").write_text(json.dumps(result))


def main():
    args = parse_args()
    if args.leak_check:
        leak_check(args.work, args.out)
    else:
        train(args.work, args.out, args.mode, args.config, args.bf16)


if __name__ == "__main__":
    main()
