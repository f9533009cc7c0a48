"""generation/decoding.py: the settings check, generate()'s arguments, stop strings and the stream's hold-back,
called directly with a toy decoder (one character per token id): no model is built."""

import threading

import pytest
import torch

from alpaca_trainml.generation import decoding, limits
from alpaca_trainml.generation.decoding import GenParams


def chars(ids):
    """The toy tokenizer's decode: token id = the character's code point."""
    return "".join(map(chr, ids))


def ids(text):
    return torch.tensor([[ord(c) for c in text]])


def test_check_params_lists_every_bad_setting_at_once():
    bad = GenParams(max_tokens=0, temperature=3, top_p=0, num_beams=9, stop=("",))
    with pytest.raises(ValueError) as e:
        decoding.check_params(bad, max_tokens_limit=100)
    msg = str(e.value)
    for needle in ("max_tokens must be an integer from 1 to 100", "temperature", "top_p", "num_beams", "stop must"):
        assert needle in msg, needle
    decoding.check_params(GenParams(), max_tokens_limit=GenParams.max_tokens)  # the defaults pass


def test_generation_limits_are_what_check_params_enforces():
    got = decoding.generation_limits(4096)
    assert got["max_tokens"] == dict(default=GenParams.max_tokens, min=1, max=4096)
    assert got["temperature"]["max"] == limits.MAX_TEMPERATURE and got["num_beams"]["max"] == limits.MAX_BEAMS
    assert got["top_p"] == dict(default=GenParams.top_p, min_exclusive=0, max=1) and got["max_stops"] == 4


def test_generation_kwargs_greedy_at_temperature_0_else_top_p_sampling():
    assert decoding.generation_kwargs(GenParams(temperature=0))["do_sample"] is False
    sampled = decoding.generation_kwargs(GenParams(temperature=1, top_p=0.5, num_beams=2))
    assert sampled == dict(do_sample=True, num_beams=2, temperature=1.0, top_p=0.5, top_k=None)
    assert isinstance(sampled["temperature"], float)  # transformers refuses an int temperature


def test_cut_at_stop_and_the_hold_back_of_a_possible_stop():
    assert decoding.cut_at_stop("one END two STOP", ("STOP", "END")) == ("one ", True)  # the earliest stop wins
    assert decoding.cut_at_stop("no stop", ("STOP",)) == ("no stop", False)
    assert decoding.stop_holdback("answer ST", ("STOP",)) == 2  # "ST" may become "STOP": not sent yet
    assert decoding.stop_holdback("answer S", ("STOP", "S!")) == 1
    assert decoding.stop_holdback("answer", ("STOP",)) == 0 and decoding.stop_holdback("x", ()) == 0


def test_stop_criteria_ends_rows_at_a_stop_string_and_all_rows_when_cancelled():
    cancel = threading.Event()
    criteria = decoding.StopCriteria(chars, 2, ("END",), cancel)
    rows = torch.tensor([[ord(c) for c in ">>abEND"], [ord(c) for c in ">>abcde"]])  # 2 prompt tokens, then text
    assert criteria(rows, None).tolist() == [True, False]
    cancel.set()
    assert criteria(rows, None).tolist() == [True, True]


def test_top_p_from_the_likeliest_few_is_the_full_sort_and_a_wide_nucleus_is_sorted_in_full(monkeypatch):
    torch.manual_seed(0)
    peaked, flat = torch.randn(3, 5000) * 8, torch.randn(3, 5000) * 0.1  # nuclei of a few tokens, of thousands
    logits = torch.cat([peaked, flat])
    temperature, top_p = torch.tensor([0.7, 1.0, 0.5, 0.7, 1.0, 0.0]), torch.tensor([0.9, 0.5, 0.99, 0.9, 0.2, 0.9])
    monkeypatch.setattr(decoding, "NUCLEUS_FIRST", 5000)  # the likeliest 5000 of 5000: the whole row, as a sort
    want = decoding.probabilities(logits, temperature, top_p)
    monkeypatch.setattr(decoding, "NUCLEUS_FIRST", 64)
    got = decoding.probabilities(logits, temperature, top_p)
    assert torch.equal(got, want)
    kept = got.gt(0).sum(-1)
    assert (kept[:3] < 64).all() and (kept[3:5] > 64).all()  # both ways taken: within the 64, and past them
