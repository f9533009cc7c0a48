"""LoRA and QLoRA (lora.py, lora_merge.py): train.py --use_peft on the tiny Llama, the adapter it saves, its merge,
resume and serving. The launches under deepspeed and torchrun are marked slow, like tests/test_train_e2e.py."""

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers import ROOT, build_tiny_llama, make_rows, subprocess_env
from safetensors.torch import load_file
from test_train_e2e import TRAINML_COMMAND, job_dir, run

import inference
import train
import weight_diff
from alpaca_trainml import cli
from alpaca_trainml.checkpoints import adapters
from alpaca_trainml.training import lora

# the tiny Llama's sentencepiece tokenizer has <unk>, <s> and </s>: train.py adds [PAD] as token 400 (vocab 400)
NEW_TOKEN = 400


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lora_argv(base, data, out, *extra):
    return [
        "--model_name_or_path", str(base), "--data_path", str(data), "--output_dir", str(out),
        "--use_peft", "True", "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "1e-2",
        "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no",
        "--report_to", "none", "--model_max_length", "128", "--seed", "0", *extra,
    ]  # fmt: skip


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def train_losses(out):
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.fixture(scope="module")
def probe():
    """(1, 12) token ids, the [PAD] row among them so that its trained embedding counts."""
    return torch.tensor([[1, 5, 17, 42, 99, NEW_TOKEN, 250, 7, 310, 64, 3, 2]])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama_dir):
    """One LoRA run with gradient checkpointing: (trainer, output folder, sha256 of the base weights before)."""
    tmp = tmp_path_factory.mktemp("lora")
    data = tmp / "data.json"
    data.write_text(json.dumps(make_rows(32, seed=3)))
    before = sha256(tiny_llama_dir / "model.safetensors")
    out = tmp / "out"
    trainer = train.train(lora_argv(tiny_llama_dir, data, out, "--max_steps", "6", "--gradient_checkpointing", "True"))
    return trainer, out, before


@pytest.fixture(scope="module")
def merged_dir(lora_run, tiny_llama_dir):
    _, out, _ = lora_run
    return weight_diff.merge_lora(str(tiny_llama_dir), str(out), str(out.parent / "merged"))


def test_impossible_combinations_are_refused_together_before_anything_loads(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--model_name_or_path", str(tmp_path / "no-such-model")]
    with pytest.raises(cli.UserError) as e:
        train.train(argv + ["--load_in_4bit", "True", "--load_in_8bit", "True", "--lora_r", "8"])
    msg = str(e.value)
    assert "--load_in_4bit and --load_in_8bit exclude each other" in msg
    assert "--lora_r, --load_in_4bit, --load_in_8bit need(s) --use_peft True" in msg
    assert "no-such-model" not in msg  # refused from the flags, before the model folder is even looked at
    with pytest.raises(ValueError) as e:
        train.parse_args(
            argv + ["--use_peft", "True", "--lora_r", "0", "--lora_dropout", "1", "--lora_target_modules", ","]
        )
    assert all(s in str(e.value) for s in ("--lora_r must be at least 1", "--lora_dropout", "--lora_target_modules"))
    with pytest.raises(ValueError, match="--load_in_4bit with --deepspeed is not supported"):
        train.parse_args(
            argv
            + [
                "--use_peft",
                "True",
                "--load_in_4bit",
                "True",
                "--deepspeed",
                str(ROOT / "ds_config_zero2_offload.json"),
            ]
        )
    model_args, _, _, _ = train.parse_args(argv + ["--use_peft", "True", "--lora_target_modules", "q_proj, v_proj"])
    assert lora.target_modules(model_args) == ["q_proj", "v_proj"] and model_args.lora_r == 16  # TRL's default


@pytest.mark.parametrize(
    "cuda, gpu_bf16, expected",
    [(False, False, "float32"), (True, False, "float16"), (True, True, "bfloat16")],
)
def test_qlora_compute_dtype_is_precisions_default_rule(monkeypatch, cuda, gpu_bf16, expected):
    """load_kwargs asks precision.resolve_dtype: bf16 on a GPU that has it, else fp16; fp32 on CPU."""
    from types import SimpleNamespace

    from alpaca_trainml import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(precision, "gpu_has_bf16", lambda: gpu_bf16)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    kwargs = lora.load_kwargs(SimpleNamespace(load_in_4bit=True, load_in_8bit=False))
    assert kwargs["quantization_config"].bnb_4bit_compute_dtype == getattr(torch, expected)
    assert kwargs["device_map"] == {"": "cuda:0" if cuda else "cpu"}  # each rank's whole model on its own device


def test_output_folder_holds_the_adapter_and_the_base_is_untouched(lora_run, tiny_llama_dir):
    _, out, before = lora_run
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "trainer_state.json"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").stat().st_size > 0 and not (out / "model.safetensors").exists()
    assert sha256(tiny_llama_dir / "model.safetensors") == before, "training wrote into the base checkpoint"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama_dir.resolve())
    assert config["trainable_token_indices"] == {"embed_tokens": [NEW_TOKEN], "lm_head": [NEW_TOKEN]}  # untied
    saved = load_file(out / "adapter_model.safetensors")
    assert all(".lora_A." in k or ".lora_B." in k or k.endswith("trainable_tokens_delta") for k in saved)
    # 2 layers x 7 linear layers (q k v o gate up down), A and B each; and one [PAD] row of width 32 per table
    assert sum(".lora_" in k for k in saved) == 2 * 7 * 2
    assert saved["base_model.model.lm_head.token_adapter.trainable_tokens_delta"].shape == (1, 32)
    assert transformers.AutoTokenizer.from_pretrained(out).pad_token == "[PAD]"


def test_only_adapter_and_new_token_parameters_change(lora_run, tiny_llama_dir):
    trainer, out, _ = lora_run
    base, _ = adapters.resized_base(out)  # the base as train.py had it before wrapping: [PAD] row = mean row
    base_params = dict(base.named_parameters())
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    for name, p in trainer.model.named_parameters():
        if name in trainable:
            continue
        plain = name.removeprefix("base_model.model.").replace(".token_adapter", "").replace(".base_layer.", ".")
        assert torch.equal(p.detach(), base_params[plain].detach()), f"{name} changed"
    # every adapter trained, in both checkpointed layers: lora_B starts at zero
    lora_b = [p for n, p in trainer.model.named_parameters() if ".lora_B." in n]
    assert len(lora_b) == 14 and all(p.abs().sum() > 0 for p in lora_b)
    rows = trainer.model.base_model.model.lm_head.token_adapter.trainable_tokens_delta["default"]
    assert not torch.equal(rows.detach(), base.lm_head.weight[NEW_TOKEN:].detach()), "the [PAD] row did not train"


def test_adapter_on_the_untouched_base_and_the_merged_model_reproduce_the_trained_logits(
    lora_run, merged_dir, tiny_llama_dir, probe, tmp_path
):
    from peft import PeftModel

    trainer, out, _ = lora_run
    trained = logits(trainer.model, probe)
    base, _ = adapters.resized_base(out)
    reloaded = logits(PeftModel.from_pretrained(base, out), probe)
    assert torch.allclose(reloaded, trained, atol=1e-6), (reloaded - trained).abs().max()
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir)
    # fp32 rounding: W + (B @ A) * s once, against x @ W + (x @ A) @ B * s in the unmerged forward
    assert torch.allclose(logits(merged, probe), trained, atol=1e-4), (logits(merged, probe) - trained).abs().max()
    assert transformers.AutoTokenizer.from_pretrained(merged_dir).pad_token == "[PAD]"
    diff = weight_diff.make_diff(str(tiny_llama_dir), merged_dir, str(tmp_path / "diff"))  # the merged model publishes
    recovered = weight_diff.recover(str(tiny_llama_dir), diff, str(tmp_path / "rec"), test_inference=False)
    assert torch.allclose(
        logits(transformers.AutoModelForCausalLM.from_pretrained(recovered), probe), trained, atol=1e-4
    )


def test_merge_refuses_an_adapter_of_another_base(lora_run, tmp_path, bpe_tokenizer_dir):
    other = build_tiny_llama(bpe_tokenizer_dir, tmp_path / "other")  # vocab 500, not 400
    with pytest.raises(
        ValueError, match="tokenizer has 401 tokens, but the base .* has 503: this adapter was trained on another base"
    ):
        weight_diff.merge_lora(str(other), str(lora_run[1]), str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()


def test_merge_takes_the_whole_tables_peft_saves_for_a_resized_vocabulary(tiny_llama_dir, tmp_path, probe):
    """An adapter from elsewhere (peft's default save): the resized embedding and lm_head saved whole."""
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    train.smart_tokenizer_and_embedding_resize({"pad_token": "[PAD]"}, tokenizer, model)
    torch.manual_seed(0)
    with torch.no_grad():  # a fine-tune that changed the whole tables
        for table in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            table.add_(torch.randn_like(table) * 0.1)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "adapter", save_embedding_layers=True)
    tokenizer.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.lm_head.weight" in saved and "base_model.model.model.embed_tokens.weight" in saved
    merged = weight_diff.merge_lora(str(tiny_llama_dir), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    expected = logits(peft_model, probe)
    got = logits(transformers.AutoModelForCausalLM.from_pretrained(merged), probe)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_export_gguf_merges_train_py_adapter_first(lora_run, merged_dir, tiny_llama_dir, tmp_path):
    gguf = pytest.importorskip("gguf")
    from alpaca_trainml.export.arch import rope_permute
    from alpaca_trainml.export.gguf import export

    _, out, _ = lora_run
    path = export(out, tmp_path / "adapter-f32.gguf", "f32")  # the base is the one adapter_config.json names
    tensors = {t.name: t.data for t in gguf.GGUFReader(path).tensors}
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).state_dict()
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q])  # so equality below tells the merged file from the base's
    want = rope_permute(merged[q], 4)  # GGUF's rope layout (4 heads)
    assert torch.allclose(torch.from_numpy(tensors["blk.1.attn_q.weight"].copy()).reshape(want.shape), want)
    emb = merged["model.embed_tokens.weight"]
    assert tuple(tensors["token_embd.weight"].shape) == tuple(emb.shape)  # the vocabulary train.py grew


def test_instruct_answers_from_an_adapter_folder_as_the_merged_model_does(lora_run, merged_dir, monkeypatch):
    _, out, _ = lora_run
    monkeypatch.setattr(inference, "_MODEL", None)
    from_adapter = inference.load_model(str(out))  # what instruct() now answers with
    answer = inference.instruct("Give a one-word title.", max_tokens=8, temperature=0)
    merged = inference.InstructModel(merged_dir)
    params = inference.GenParams(max_tokens=8, temperature=0)
    a, b = (m.generate([m.encode_instruction("Give a one-word title.")], params)[0] for m in (from_adapter, merged))
    assert (a.text, a.completion_tokens) == (b.text, b.completion_tokens) and a.completion_tokens >= 1
    assert answer == a.text.strip()


def test_base_model_overrides_the_one_the_adapter_names(lora_run, tmp_path, tiny_llama_dir, bpe_tokenizer_dir):
    import shutil

    moved = shutil.copytree(lora_run[1], tmp_path / "moved", ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")  # the base folder moved since training
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="gone: no such folder"):
        inference.InstructModel(str(moved))
    assert inference.InstructModel(str(moved), base_model=str(tiny_llama_dir)).model.config.vocab_size == 401
    other = build_tiny_llama(bpe_tokenizer_dir, tmp_path / "other")
    # 400 + [PAD] in the adapter's tokenizer; the BPE base gets [PAD], <s> and <unk>: 500 + 3
    with pytest.raises(ValueError, match=r"tokenizer has 401 tokens, but the base .*other.* has 503"):
        inference.InstructModel(str(moved), base_model=str(other))


@pytest.mark.parametrize("flag, layer", [("--load_in_4bit", "Linear4bit"), ("--load_in_8bit", "Linear8bitLt")])
def test_qlora_trains_with_falling_loss_and_merges_into_the_fp32_base(tiny_llama_dir, tmp_path, probe, flag, layer):
    from peft import PeftModel

    data = tmp_path / "data.json"
    data.write_text(json.dumps(make_rows(48, seed=4)))
    out = tmp_path / "qlora"
    trainer = train.train(lora_argv(tiny_llama_dir, data, out, flag, "True", "--max_steps", "12"))
    assert type(trainer.model.base_model.model.model.layers[0].mlp.up_proj.base_layer).__name__ == layer
    losses = list(train_losses(out).values())
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) < sum(losses[:3]), losses  # ln(400) ~ 6 at the start of a random model
    merged = weight_diff.merge_lora(str(tiny_llama_dir), str(out), str(tmp_path / "merged"))
    base, _ = adapters.resized_base(out)  # the full-precision base, the adapter applied by peft
    expected = logits(PeftModel.from_pretrained(base, out), probe)
    got = logits(transformers.AutoModelForCausalLM.from_pretrained(merged), probe)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_resume_from_a_lora_checkpoint_continues_the_step_count_and_the_loss_curve(tiny_llama_dir, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(make_rows(48, seed=5)))
    # constant learning rate: the first 4 steps of an 8-step run are then the same whatever max_steps says
    flags = ("--lr_scheduler_type", "constant", "--save_strategy", "steps", "--save_steps", "2")
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.train(lora_argv(tiny_llama_dir, data, straight, *flags, "--max_steps", "8"))
    train.train(lora_argv(tiny_llama_dir, data, split, *flags, "--max_steps", "4"))
    assert (split / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert not (split / "checkpoint-4" / "model.safetensors").exists()
    train.train(lora_argv(tiny_llama_dir, data, split, *flags, "--max_steps", "8"))  # resumes on its own
    state = json.loads((split / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    resumed, reference = train_losses(split), train_losses(straight)
    assert sorted(resumed) == list(range(1, 9))  # steps 1-4 from the checkpoint's history, 5-8 trained now
    for step in range(5, 9):  # a restart from scratch would repeat step 1's loss here
        assert resumed[step] == pytest.approx(reference[step], rel=1e-4), (step, resumed, reference)


# --- the seed's launchers with --use_peft True: 2 CPU ranks, as tests/test_train_e2e.py -------------------------
@pytest.mark.slow
def test_trainml_deepspeed_command_with_use_peft_saves_an_adapter_that_merges(tmp_path, tiny_llama_dir):
    model_path = job_dir(tmp_path, 128)
    out = tmp_path / "output"
    env = subprocess_env(TRAINML_CHECKPOINT_PATH=tiny_llama_dir, TRAINML_MODEL_PATH=model_path, TRAINML_OUTPUT_PATH=out)
    proc = run(TRAINML_COMMAND + " --model_max_length 256 --use_peft True --num_train_epochs 1", model_path, env)
    assert "2 rank(s), DistributedType.DEEPSPEED" in proc.stdout + proc.stderr
    assert_adapter_merges(out, tiny_llama_dir, tmp_path)


@pytest.mark.slow
def test_readme_fsdp_command_with_use_peft_saves_an_adapter_that_merges(tmp_path, tiny_llama_dir, free_port):
    model_path = job_dir(tmp_path, 128)
    out = tmp_path / "fsdp_out"
    cmd = f"""torchrun --nproc_per_node=2 --master_port={free_port} train.py \\
    --model_name_or_path {tiny_llama_dir} --data_path ./alpaca_data.json --bf16 True --output_dir {out} \\
    --num_train_epochs 1 --per_device_train_batch_size 4 --gradient_accumulation_steps 2 \\
    --evaluation_strategy "no" --save_strategy "steps" --save_steps 2000 --learning_rate 2e-4 \\
    --logging_steps 1 --fsdp "full_shard auto_wrap" --fsdp_transformer_layer_cls_to_wrap 'LlamaDecoderLayer' \\
    --tf32 True --model_max_length 256 --use_peft True"""
    proc = run(cmd, model_path, subprocess_env())
    assert "2 rank(s), DistributedType.FSDP" in proc.stderr
    assert_adapter_merges(out, tiny_llama_dir, tmp_path)


@pytest.mark.slow
def test_zero3_with_use_peft_on_cpu_is_one_clear_error(tmp_path, tiny_llama_dir, free_port):
    model_path = job_dir(tmp_path, 64)
    cmd = f"""torchrun --nproc_per_node=2 --master_port={free_port} train.py \\
      --model_name_or_path {tiny_llama_dir} --data_path ./alpaca_data.json --output_dir {tmp_path / "z3_out"} \\
      --deepspeed "./configs/default_offload_opt_param.json" --report_to none --use_peft True"""
    env = subprocess_env()
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    proc = subprocess.run(["bash", "-c", cmd], cwd=model_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode != 0
    # peft 0.21 sets up trainable tokens under ZeRO-3 with torch.cuda: refused by name, not a CUDA traceback
    assert "train.py: error: --use_peft under ZeRO-3 cannot train the 1 new special-token rows without a GPU" in (
        proc.stderr
    )
    assert "Torch not compiled with CUDA" not in proc.stderr


def assert_adapter_merges(out, base_dir, tmp_path):
    """The launch saved an adapter (not a model) that changed, and it merges into a model that loads."""
    saved = load_file(out / "adapter_model.safetensors")
    assert not (out / "model.safetensors").exists()
    # the [PAD] rows as trainable tokens, not whole embedding tables: the launcher saved through our save_pretrained
    assert all(".lora_" in k or k.endswith("trainable_tokens_delta") for k in saved), sorted(saved)
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in saved.items()), "lora_B still all zero"
    merged = weight_diff.merge_lora(str(base_dir), str(out), str(tmp_path / "merged"))
    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[name], base.state_dict()[name])
