"""inference.py: the pure helpers, then instruct() and InstructModel on tiny checkpoints built here."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch
import transformers
from helpers import ROOT
from scripted_llama import SCRIPT, build_scripted_llama

import inference
from alpaca_trainml.generation import decoding
from alpaca_trainml.generation import model as model_module
from inference import GenParams, InstructModel, PromptTooLongError
from utils import EMBEDDED_MODEL, format_prompt

ANSWER = "".join(SCRIPT)  # what the scripted model writes after any prompt


@pytest.fixture(scope="session")
def scripted_dir(tmp_path_factory, spm_tokenizer_dir):
    return build_scripted_llama(spm_tokenizer_dir, tmp_path_factory.mktemp("scripted"))


@pytest.fixture(scope="module")
def scripted(scripted_dir):
    return InstructModel(str(scripted_dir))


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return InstructModel(str(tiny_llama_dir))


# --- pure helpers -----------------------------------------------------------------------------
def test_check_params_reports_every_bad_setting_with_its_range():
    decoding.check_params(GenParams(max_tokens=1, temperature=0, top_p=1, num_beams=8, stop=("a",) * 4), 100)
    with pytest.raises(ValueError) as e:
        decoding.check_params(GenParams(max_tokens=0, temperature=2.5, top_p=0, num_beams=9, stop=("",)), 100)
    msg = str(e.value)
    for needle in [
        "max_tokens must be an integer from 1 to 100",
        "temperature must be a number from 0 to 2",
        "top_p must be a number above 0",
        "num_beams must be an integer from 1 to 8",
        "stop must be",
    ]:
        assert needle in msg
    with pytest.raises(ValueError, match="max_tokens"):
        decoding.check_params(GenParams(max_tokens=True), 100)  # a bool is not a token count


def test_stop_helpers():
    assert decoding.cut_at_stop("abc 20. def", ["20.", "\n20"]) == ("abc ", True)
    assert decoding.cut_at_stop("abc", ["x"]) == ("abc", False)
    assert decoding.cut_at_stop("a\n20 b 20.", ["20.", "\n20"]) == ("a", True)  # the earliest stop wins
    assert decoding.stop_holdback("answer 2", ["20."]) == 1  # "2" may become "20."
    assert decoding.stop_holdback("answer 20", ["20."]) == 2
    assert decoding.stop_holdback("answer", ["20."]) == 0
    assert decoding.stop_holdback("x", []) == 0


def test_generation_kwargs_greedy_at_temperature_zero():
    assert decoding.generation_kwargs(GenParams(temperature=0))["do_sample"] is False
    kw = decoding.generation_kwargs(GenParams(temperature=0.7, top_p=0.9, num_beams=2))
    assert (kw["do_sample"], kw["temperature"], kw["top_p"], kw["num_beams"]) == (True, 0.7, 0.9, 2)


def test_training_length_comes_from_the_saved_tokenizer_else_512():
    assert model_module.training_length(SimpleNamespace(model_max_length=256), 2048) == 256  # as train.py saves it
    assert model_module.training_length(SimpleNamespace(model_max_length=int(1e30)), 2048) == 512  # "no limit" sentinel
    assert model_module.training_length(SimpleNamespace(model_max_length=int(1e30)), 128) == 128


def test_the_default_model_is_trainml_checkpoint_then_embedded(monkeypatch):
    asked = []

    def fake_from_pretrained(loader, name, **kwargs):
        asked.append(name)
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(model_module, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(model_module, "check_checkpoint", lambda name: None)  # /ckpt/alpaca is not here
    monkeypatch.delenv("TRAINML_CHECKPOINT_PATH", raising=False)
    for _ in range(2):
        with pytest.raises(RuntimeError):
            InstructModel()
        monkeypatch.setenv("TRAINML_CHECKPOINT_PATH", "/ckpt/alpaca")
    assert asked == [EMBEDDED_MODEL, "/ckpt/alpaca"]


# --- the model --------------------------------------------------------------------------------
def test_import_loads_nothing_and_instruct_loads_the_trainml_checkpoint(scripted_dir, monkeypatch):
    spec = importlib.util.spec_from_file_location("inference_fresh", ROOT / "inference.py")  # a fresh import
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh._MODEL is None, "loaded at import"
    monkeypatch.setenv("TRAINML_CHECKPOINT_PATH", str(scripted_dir))
    assert fresh.instruct("Name a bakery.", temperature=0) == ANSWER.strip()
    assert fresh._MODEL.name == str(scripted_dir)


def test_max_tokens_counts_new_tokens_only(scripted):
    long_instruction = "Summarize the text. " * 40  # ~200 tokens: the fork's max_length=2 would allow nothing
    ids = scripted.encode_instruction(long_instruction)
    assert len(ids) > 100
    (c,) = scripted.generate([ids], GenParams(max_tokens=2, temperature=0))
    assert (c.text, c.completion_tokens, c.finish_reason) == (SCRIPT[0] + SCRIPT[1], 2, "length")
    (c,) = scripted.generate([ids], GenParams(max_tokens=50, temperature=2))  # sampling: the gap still decides
    assert c.text == ANSWER and c.finish_reason == "stop"
    assert c.completion_tokens == len(SCRIPT) + 1  # the pieces, then end-of-text (not in the text)


def test_over_long_prompt_is_refused_or_truncated_on_request(scripted):
    limit = scripted.max_prompt_tokens
    assert limit == 512  # the test tokenizer saves no model_max_length: the default applies
    article = " ".join(["The river counts three apples."] * 200)
    with pytest.raises(PromptTooLongError, match=r"the prompt is \d+ tokens; this model was trained on at most 512"):
        scripted.encode_instruction("Summarize the text.", article)
    ids = scripted.encode_instruction("Summarize the text.", article, truncate=True)
    assert limit - 8 <= len(ids) <= limit  # cut to fit, not far below
    prompt = scripted.decode(ids)
    assert prompt.startswith(format_prompt("Summarize the text.", "The river")[:60]) and prompt.endswith(
        "### Response:"
    )
    with pytest.raises(PromptTooLongError):
        scripted.encode("x " * 2000)
    full = scripted.tokenizer("one two " * 600)["input_ids"]
    assert full[0] != scripted.tokenizer.bos_token_id  # this test tokenizer adds no BOS: nothing to keep in front
    assert scripted.encode("one two " * 600, truncate=True) == full[-limit:]  # a raw prompt keeps its end


def test_instruct_strips_and_validates(scripted_dir, monkeypatch):
    monkeypatch.setattr(inference, "_MODEL", None)
    monkeypatch.setenv("TRAINML_CHECKPOINT_PATH", str(scripted_dir))
    assert inference.instruct("Name a bakery.", input="", temperature=0) == ANSWER.strip()
    assert "</s>" not in inference.instruct("Name a bakery.", "rye", max_tokens=5)
    with pytest.raises(ValueError, match="instruction must be a non-empty string"):
        inference.instruct("  ")
    with pytest.raises(ValueError, match="top_p"):
        inference.instruct("Name a bakery.", top_p=1.5)


def test_stop_strings_and_streaming_agree(scripted):
    ids = scripted.encode_instruction("Name a bakery.")
    deltas = []
    (c,) = scripted.generate([ids], GenParams(max_tokens=20, temperature=0, stop=("4. Output",)), on_text=deltas.append)
    assert c.text == SCRIPT[0][: SCRIPT[0].index("4. Output")] and c.finish_reason == "stop"
    assert "".join(deltas) == c.text
    deltas.clear()
    (c,) = scripted.generate([ids], GenParams(max_tokens=20, temperature=0), on_text=deltas.append)
    assert deltas == list(SCRIPT)  # one delta per token: each piece is one token


def test_batched_greedy_equals_one_at_a_time(tiny):
    """Left padding and the attention mask must not change a row's answer."""
    prompts = [
        tiny.encode_instruction(t)
        for t in ["Count.", "Summarize the text about the river and the red kite.", "Give a one-word title."]
    ]
    params = GenParams(max_tokens=12, temperature=0)
    alone = [tiny.generate([p], params)[0] for p in prompts]
    together = tiny.generate(prompts, params, row_max_tokens=[12, 12, 5])
    assert [c.text for c in together[:2]] == [c.text for c in alone[:2]]
    assert together[2].completion_tokens <= 5


def test_context_window_is_checked_before_generating(scripted):
    ids = scripted.encode_instruction("Name a bakery.")
    with pytest.raises(inference.ContextLengthError, match="maximum context length is 8192 tokens"):
        scripted.generate([ids], GenParams(max_tokens=8192))  # scripted_llama's default context window


def test_cli_prints_the_answer(scripted_dir, capsys, monkeypatch):
    monkeypatch.setattr(inference, "_MODEL", None)
    inference.main(
        inference.parse_args(
            [
                "--model_name_or_path",
                str(scripted_dir),
                "--instruction",
                "Hi",
                "--temperature",
                "0",
                "--max_tokens",
                "1",
            ]
        )
    )
    assert capsys.readouterr().out.strip() == SCRIPT[0].strip()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--instruction", "Hi", "--temperature", "9"], "temperature must be a number from 0 to 2"),
        (["--instruction", "  "], "--instruction is empty"),
        (["--instruction", "Hi", "--model_name_or_path", "./no/such/model"], "./no/such/model: no such folder"),
    ],
)
def test_cli_mistakes_are_refused_before_any_model_loads(argv, expected, monkeypatch):
    monkeypatch.setattr(inference, "_MODEL", None)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail())
    with pytest.raises(ValueError, match=expected):
        inference.main(inference.parse_args(argv))


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_dtype_auto_is_bf16_only_on_a_cpu_that_computes_it(tiny_llama_dir, monkeypatch, native, expected):
    from alpaca_trainml import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    model = InstructModel(str(tiny_llama_dir), device="cpu", dtype="auto")
    assert str(model.model.dtype) == f"torch.{expected}"
    assert InstructModel(str(tiny_llama_dir), device="cpu").model.dtype == torch.float32  # None: fp32 on CPU, as before
    assert inference.parse_args(["--instruction", "x"]).dtype is None  # today's choice unless asked
    assert inference.parse_args(["--instruction", "x", "--dtype", "float32"]).dtype == "float32"


def test_a_misspelled_flag_is_named_with_the_real_one(capsys):
    with pytest.raises(SystemExit) as e:
        inference.parse_args(["--instrucion", "Name a colour."])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--instrucion (did you mean --instruction?)" in err and "required" not in err


def test_a_checkpoint_without_its_tokenizer_is_refused_before_it_loads(tiny_llama_dir, tmp_path, monkeypatch):
    import shutil

    for name in ("config.json", "model.safetensors"):  # what model.save_pretrained alone writes
        (tmp_path / "m").mkdir(exist_ok=True)
        shutil.copy(tiny_llama_dir / name, tmp_path / "m" / name)
    monkeypatch.setattr(inference, "_MODEL", None)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail())
    with pytest.raises(ValueError, match="not a complete checkpoint: no tokenizer"):
        inference.main(inference.parse_args(["--instruction", "Hi", "--model_name_or_path", str(tmp_path / "m")]))
