"""generation/batch.py: the decoder core's rows (stop strings, the stream hold-back, finish reasons) and sampling,
on token ids that are characters, without a model."""

import torch

from alpaca_trainml.generation import batch
from alpaca_trainml.generation.batch import Job, Row, fill_holes, sample
from alpaca_trainml.generation.decoding import GenParams


def chars(ids):
    return "".join(chr(i) for i in ids)


def row_for(params, on_text=None, eos=(0,), context_window=1000):
    job = Job(ids=[ord(c) for c in "prompt"], params=params, on_text=on_text)
    return job, Row(job, chars, set(eos), context_window)


def feed(row, text):
    """Add text one character (token) at a time; True once the row has ended."""
    return any(row.add(ord(c)) for c in text)


def test_the_stream_never_sends_a_stop_string_or_text_that_may_become_one():
    sent = []
    job, row = row_for(GenParams(max_tokens=100, stop=["STOP"]), on_text=sent.append)
    assert not feed(row, "Hi ST")
    assert "".join(sent) == "Hi "  # "ST" may be the start of "STOP": it waits
    assert not feed(row, "x ")
    assert "".join(sent) == "Hi STx "  # it was not: sent now
    assert feed(row, "STOP never")  # the stop string ends the row at once
    assert "".join(sent) == "Hi STx " and job.future.result().text == "Hi STx "
    assert job.future.result().finish_reason == "stop"


def test_end_of_text_and_max_tokens_end_a_row_with_their_reasons():
    job, row = row_for(GenParams(max_tokens=3))
    assert feed(row, "abcd")  # the third token reaches max_tokens
    assert (job.future.result().text, job.future.result().finish_reason) == ("abc", "length")
    job, row = row_for(GenParams(max_tokens=10))
    assert not feed(row, "ab") and row.add(0)  # 0: end of text, not part of the answer
    done = job.future.result()
    assert (done.text, done.finish_reason, done.completion_tokens) == ("ab", "stop", 3)  # usage counts end-of-text


def test_greedy_rows_take_the_argmax_and_sampled_rows_stay_in_their_nucleus():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.0], [4.0, 3.9, -9.0, -9.0]])
    temperature, top_p = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.5])
    for _ in range(20):
        picked = sample(logits, temperature, top_p).tolist()
        assert picked[0] == 1  # greedy
        assert picked[1] == 0  # top_p 0.5: token 0 alone (p ~0.52) already reaches it


def test_draw_picks_each_index_as_often_as_its_weight_and_never_a_zero_one():
    torch.manual_seed(0)
    weights = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25, 0.0]] * 8)  # unnormalised weights work too: x2 below
    picks = torch.cat([batch.draw(w) for w in (weights, 2 * weights) for _ in range(500)])  # 8000 draws
    share = torch.bincount(picks, minlength=6) / len(picks)
    assert share[[0, 2, 5]].eq(0).all()
    # 8000 draws: the standard error of a 0.5 share is 0.0056, of 0.25 0.0048; 0.03 is over 5 of them
    assert torch.allclose(share[[1, 3, 4]], torch.tensor([0.5, 0.25, 0.25]), atol=0.03), share


def test_rows_that_leave_make_holes_the_last_rows_fill():
    assert fill_holes(8, [2, 5]) == [0, 1, 6, 3, 4, 7]
    assert fill_holes(4, [3]) == [0, 1, 2]  # the last row left: nothing moves
    assert fill_holes(4, [0, 1, 2, 3]) == []
    assert fill_holes(5, [1, 4]) == [0, 3, 2]  # a leaving last row moves nowhere
