"""Tests of train_dpo.py (training/dpo.py, data/preference.py): both preference shapes and the bad-row report, the
prompt rendered by the chat template, short DPO runs on the tiny Llama (full and LoRA), and the seed's deepspeed
ZeRO-2 command on 2 CPU ranks (slow, as tests/test_train_e2e.py)."""

import json

import pytest
import torch
import transformers
from helpers import ROOT, load_all, load_tokenizer, make_rows, subprocess_env
from test_train_e2e import TRAINML_COMMAND, assert_loads_and_changed, job_dir, run

import train_dpo
from alpaca_trainml import cli
from alpaca_trainml.data import preference, prompts
from alpaca_trainml.training import dpo, reporting


def sharegpt_pairs(n, seed=0):
    """n made-up ShareGPT preference rows: the chosen answer is the row's output, the rejected one repeats the
    instruction; every third has a system turn and an earlier exchange."""
    pairs = []
    for i, r in enumerate(make_rows(n, seed=seed)):
        turns = [{"from": "human", "value": r["instruction"]}]
        if i % 3 == 2:
            turns = [
                {"from": "system", "value": "Answer briefly."},
                {"from": "human", "value": "Hello."},
                {"from": "gpt", "value": "Hello. Ask away."},
            ] + turns
        pairs.append(
            {
                "conversations": turns,
                "chosen": {"from": "gpt", "value": r["output"]},
                "rejected": {"from": "gpt", "value": f"{r['instruction']} {r['instruction']}"},
            }
        )
    return pairs


def trl_pairs(n, seed=1):
    """n made-up rows in TRL's conversational prompt/chosen/rejected shape."""
    return [
        {
            "prompt": [{"role": "user", "content": r["instruction"]}],
            "chosen": [{"role": "assistant", "content": r["output"]}],
            "rejected": [{"role": "assistant", "content": f"{r['instruction']} {r['instruction']}"}],
        }
        for r in make_rows(n, seed=seed)
    ]


# --- data: both shapes, JSON and JSONL, and the report of bad rows


def test_sharegpt_rows_become_messages_with_their_system_turn(data_file):
    rows = sharegpt_pairs(3)
    rows[0]["system"] = "Be terse."  # LLaMA-Factory's optional system column
    pairs = preference.load_pairs(data_file(rows))
    assert pairs[0]["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": rows[0]["conversations"][0]["value"]},
    ]
    assert [m["role"] for m in pairs[2]["messages"]] == ["system", "user", "assistant", "user"]
    assert pairs[1]["chosen"] == rows[1]["chosen"]["value"] and pairs[1]["rejected"] == rows[1]["rejected"]["value"]


def test_trl_rows_read_as_strings_or_messages_from_jsonl(tmp_path):
    rows = trl_pairs(2) + [{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Name a colour."}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pairs = preference.load_pairs(path)
    assert len(pairs) == 3 and pairs[0]["messages"] == rows[0]["prompt"]
    assert pairs[0]["chosen"] == rows[0]["chosen"][0]["content"]
    user = [{"role": "user", "content": "Name a colour."}]
    assert pairs[2] == {"messages": user, "chosen": "Blue.", "rejected": "Name a colour."}


def test_bad_rows_get_one_numbered_line_each(data_file):
    rows = sharegpt_pairs(8)
    rows[0]["conversations"][0]["from"] = "bot"
    rows[1]["conversations"].append({"from": "gpt", "value": "an answer where the question should be"})
    rows[2]["conversations"][-1]["value"] = "  "
    rows[3] = ["not", "an", "object"]
    rows[4] = trl_pairs(1)[0]
    rows[5]["rejected"] = {"from": "gpt", "value": rows[5]["chosen"]["value"]}
    rows[6]["rejectd"] = rows[6].pop("rejected")
    rows[7]["chosen"] = "a bare string"
    with pytest.raises(ValueError) as e:
        preference.load_pairs(path := data_file(rows))
    lines = str(e.value).splitlines()
    assert lines[0] == f"{path}: 9 problem(s) in the data:"
    assert lines[1:] == [
        "  row 0: conversations[0]: unknown 'from' 'bot' (expected system, human or gpt)",
        "  row 1: 'conversations' must end with a human turn (the one chosen and rejected answer)",
        "  row 2: conversations[3].value is empty",
        "  row 3: expected an object, found list",
        "  row 4: TRL (prompt + chosen + rejected), but the file's rows are "
        "ShareGPT (conversations + chosen + rejected)",
        "  row 5: 'chosen' and 'rejected' are the same answer (the pair teaches nothing)",
        "  row 6: unknown field 'rejectd' (did you mean rejected?)",
        "  row 6: missing field(s) 'rejected'",
        "  row 7: 'chosen' must be an object {from: gpt, value}, found str",
    ]


def test_trl_rows_with_a_bad_prompt_or_answer_are_named(data_file):
    rows = trl_pairs(3)
    rows[0]["prompt"].append({"role": "assistant", "content": "an answer"})
    rows[1]["chosen"] = [{"role": "user", "content": "not an answer"}]
    rows[2]["prompt"][0]["role"] = "tool"
    with pytest.raises(ValueError) as e:
        preference.load_pairs(data_file(rows))
    assert "row 0: 'prompt' must end with a user message" in str(e.value)
    assert "row 1: 'chosen'[0] must be an assistant message, found role 'user'" in str(e.value)
    assert "row 2: 'prompt'[0]: unknown role 'tool' (expected system, user or assistant)" in str(e.value)


def test_a_file_of_other_rows_names_the_shapes_it_takes(data_file):
    with pytest.raises(ValueError, match="no row is a preference pair; expected ShareGPT"):
        preference.load_pairs(data_file(make_rows(2)))


@pytest.mark.parametrize("tokenizer_fixture", ["spm_tokenizer_dir", "bpe_tokenizer_dir"])
def test_the_prompt_text_encodes_to_the_chat_templates_ids(tokenizer_fixture, request):
    # DPOTrainer encodes the prompt text with the tokenizer's special tokens: no second BOS, no lost one
    tokenizer = prompts.ALPACA.install(load_tokenizer(request.getfixturevalue(tokenizer_fixture)))
    pairs = preference.validate_pairs(sharegpt_pairs(3), "x")
    for pair, row in zip(pairs, preference.to_trl_rows(pairs, tokenizer, prompts.ALPACA)):
        messages = pair["messages"]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
        assert tokenizer(row["prompt"])["input_ids"] == ids["input_ids"]
        assert row["chosen"] == pair["chosen"] + tokenizer.eos_token  # as the Alpaca style trains an answer
    (row,) = preference.to_trl_rows(
        [dict(messages=[{"role": "user", "content": "Sort the list."}], chosen="a", rejected="b")],
        tokenizer,
        prompts.ALPACA,
    )
    assert row["prompt"].endswith("### Instruction:\nSort the list.\n\n### Response:")


# --- the command line: mistakes answered before the model loads


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(dpo, "load_model_and_tokenizer", refuse)


def run_dpo_cli(argv, capsys):
    """train_dpo.py's command line as a user runs it: what it printed. Asserts it exited with status 2."""
    with pytest.raises(SystemExit) as exc:
        cli.run("train_dpo.py", train_dpo.train_dpo, argv)
    assert exc.value.code == 2  # cli.USAGE_EXIT
    return capsys.readouterr().err.rstrip("\n")


def test_bad_pairs_are_reported_before_the_model_loads(data_file, tmp_path, no_model_load, capsys):
    rows = sharegpt_pairs(2)
    rows[1]["conversations"] = []
    message = run_dpo_cli(["--data_path", str(data_file(rows)), "--output_dir", str(tmp_path)], capsys)
    assert message.startswith("train_dpo.py: error: ") and "row 1: 'conversations' must be a non-empty list" in message


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--beta", "0"], "--beta must be above 0, got 0.0"),
        (["--max_length", "4"], "--max_length must be at least 8, got 4"),
        (["--bta", "0.1"], "unknown flag(s): --bta (did you mean --beta?)"),
        (["--lora_r", "4"], "--lora_r need(s) --use_peft True"),
    ],
)
def test_flag_mistakes_are_one_line(argv, expected, tmp_path, no_model_load, capsys):
    assert expected in run_dpo_cli(["--output_dir", str(tmp_path), *argv], capsys)


# --- short runs on the tiny Llama


def dpo_argv(base, data, out, *extra):
    return [
        "--model_name_or_path", str(base), "--data_path", str(data), "--output_dir", str(out),
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--max_length", "128", "--seed", "0", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_llama_dir):
    """Full DPO on 16 ShareGPT pairs for 2 epochs, 4 TRL-shaped eval pairs: (trainer, output folder)."""
    tmp = tmp_path_factory.mktemp("dpo")
    (tmp / "train.json").write_text(json.dumps(sharegpt_pairs(16)))
    (tmp / "eval.json").write_text(json.dumps(trl_pairs(4)))
    argv = dpo_argv(tiny_llama_dir, tmp / "train.json", tmp / "out", "--eval_data_path", str(tmp / "eval.json"))
    trainer = train_dpo.train_dpo(argv + ["--learning_rate", "1e-3", "--num_train_epochs", "2"])
    return trainer, tmp / "out"


def test_dpo_changes_the_weights_and_saves_model_template_and_picture(dpo_run, tiny_llama_dir):
    _, out = dpo_run
    assert_loads_and_changed(out, tiny_llama_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert "### Response:" in tokenizer.chat_template  # the Alpaca template the prompts were rendered with
    assert (out / "loss.png").stat().st_size > 0


def test_the_reference_stays_the_initial_policy(dpo_run, tiny_llama_dir):
    trainer, _ = dpo_run
    initial = load_all(tiny_llama_dir)
    ref = trainer.ref_model.state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(ref[name], initial[name])
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())


def test_held_out_reward_accuracy_and_margin_rise(dpo_run):
    trainer, out = dpo_run
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [h for h in history if "eval_rewards/accuracies" in h]
    # step 0 is the untrained policy, which is the reference: every reward is 0, so no pair is won
    assert evals[0]["step"] == 0 and evals[0]["eval_rewards/accuracies"] == 0.0
    assert evals[-1]["eval_rewards/accuracies"] > 0.5 and evals[-1]["eval_rewards/margins"] > 0
    assert [h for h in history if "rewards/margins" in h], "training logged no reward margins"


def test_reward_series_go_to_the_second_panel(tmp_path):
    history = [{"step": 1, "loss": 0.69, "rewards/margins": 0.0, "rewards/accuracies": 0.0}]
    history += [{"step": 2, "loss": 0.5, "rewards/margins": 0.4, "rewards/accuracies": 1.0}]
    assert reporting.series(history, "rewards/margins") == [(1, 0.0), (2, 0.4)]
    reporting.plot_loss(history, tmp_path / "loss.png", "t")
    sft = tmp_path / "sft.png"
    reporting.plot_loss([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], sft, "t")
    # a DPO picture has two panels: wider than the one-panel SFT picture (13 inches against 8, at 100 dpi)
    from PIL import Image

    assert Image.open(tmp_path / "loss.png").size[0] == 1300 and Image.open(sft).size[0] == 800


def test_lora_dpo_saves_an_adapter_and_leaves_the_base(tmp_path, tiny_llama_dir):
    (tmp_path / "train.json").write_text(json.dumps(sharegpt_pairs(8)))
    out = tmp_path / "out"
    argv = dpo_argv(tiny_llama_dir, tmp_path / "train.json", out, "--use_peft", "True", "--lora_r", "4")
    trainer = train_dpo.train_dpo(argv + ["--learning_rate", "1e-2", "--max_steps", "2"])
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists() and not (out / "ref").exists()  # no copy of TRL's "ref" adapter
    assert list(trainer.model.peft_config) == ["default"] and trainer.ref_model is None
    lora_b = [v for k, v in load_all(out).items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b), "the adapter did not train"


def test_a_second_run_resumes_from_the_last_checkpoint(tmp_path, tiny_llama_dir, caplog):
    (tmp_path / "train.json").write_text(json.dumps(sharegpt_pairs(16, seed=4)))
    out = tmp_path / "out"
    argv = dpo_argv(tiny_llama_dir, tmp_path / "train.json", out, "--learning_rate", "1e-3")
    argv[argv.index("--save_strategy") + 1] = "steps"
    train_dpo.train_dpo(argv + ["--save_steps", "2", "--max_steps", "2"])
    assert (out / "checkpoint-2" / "trainer_state.json").exists()
    with caplog.at_level("WARNING"):
        trainer = train_dpo.train_dpo(argv + ["--save_steps", "2", "--max_steps", "4"])
    assert f"resuming from {out / 'checkpoint-2'}" in caplog.text
    assert trainer.state.global_step == 4
    steps = [h["step"] for h in trainer.state.log_history if "loss" in h]
    assert steps == [1, 2, 3, 4]  # the first run's two steps, from the checkpoint, then two more


# --- the seed's launch command


@pytest.mark.slow
def test_trainml_deepspeed_zero2_command_runs_dpo_on_two_cpu_ranks(tmp_path, tiny_llama_dir):
    model_path = job_dir(tmp_path, 4)
    (model_path / "train_dpo.py").symlink_to(ROOT / "train_dpo.py")
    (model_path / "alpaca_data.json").write_text(json.dumps(sharegpt_pairs(256, seed=5)))
    out = tmp_path / "output"
    env = subprocess_env(TRAINML_CHECKPOINT_PATH=tiny_llama_dir, TRAINML_MODEL_PATH=model_path, TRAINML_OUTPUT_PATH=out)
    # the seed's command, but train_dpo.py, one epoch, a rate that moves the tiny model in a few steps, and room for
    # every prompt (no pair dropped, so the step count below holds)
    command = TRAINML_COMMAND.replace("train.py", "train_dpo.py")
    command = command.replace("--num_train_epochs 3", "--num_train_epochs 1")
    command = command.replace("--learning_rate 2e-5", "--learning_rate 1e-3") + " --max_length 256"
    proc = run(command, model_path, env)
    assert "2 rank(s), DistributedType.DEEPSPEED" in proc.stdout + proc.stderr and "dropped" not in proc.stderr
    assert_loads_and_changed(out, tiny_llama_dir)
    state = json.loads((out / "trainer_state.json").read_text())
    # 256 pairs / (16 per rank * 2 ranks * 2 accumulation) = 4 steps; the first is warmup at rate 0 (0.03 * 4 -> 1)
    assert state["global_step"] == 4 and any("rewards/margins" in h for h in state["log_history"])
    assert (out / "loss.png").stat().st_size > 0
