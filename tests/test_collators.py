"""--padding_free: the same micro-batch laid end to end gives the padded path's loss and gradients."""

import json

import pytest
import torch
from helpers import make_rows, tiny_llama_config
from transformers import LlamaForCausalLM

import train
from alpaca_trainml.data import collators
from alpaca_trainml.training import segment_attention

PAD = 0
LENGTHS = [37, 5, 52, 18, 29, 44, 11]  # one micro-batch; rows of at most 64 tokens below


class Tok:
    pad_token_id = PAD


def micro_batch(lengths=LENGTHS, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 3] = -100  # the prompt
        out.append(dict(input_ids=ids, labels=labels))
    return out


def tiny_llama(attn):
    torch.manual_seed(0)
    config = tiny_llama_config(96, max_position_embeddings=256, pad_token_id=PAD)
    config._attn_implementation = attn
    return LlamaForCausalLM(config)


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_pack_rows_fills_rows_up_to_the_limit_and_keeps_every_example_once():
    rows = collators.pack_rows(LENGTHS, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[i] for i in row) <= 64 for row in rows)
    assert len(rows) == 4  # 196 tokens need at least 4 rows of 64
    assert collators.pack_rows([10, 10], 100) == [[0, 1]]
    # rows are padded to the longest, so they are balanced: first fit would give [300, 200] and [100, 50] (width 500)
    assert collators.pack_rows([300, 200, 100, 50], 512) == [[0, 3], [1, 2]]  # 350 and 300 tokens
    assert collators.pack_rows([60, 60, 60], 100) == [[0], [1], [2]]  # 180 tokens fit 2 rows of 100 only on paper
    # each into the emptiest row gives 5+3+2 and 4+4: 2 rows of width 10; into the fullest that fits, 4+5 and 4+3+2:
    # width 9, 18 token slots instead of 20
    assert collators.pack_rows([4, 4, 3, 5, 2], 10) == [[0, 3], [1, 2, 4]]


def test_collator_layout_positions_labels_and_mask():
    batch = collators.DataCollatorPaddingFree(Tok(), 64)(micro_batch([3, 2]))
    assert batch["input_ids"].shape == (1, 5)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"][0, 3].item() == -100  # never predicted from the other example's last token
    mask = batch["attention_mask"][0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]


@pytest.mark.parametrize("attn", ["sdpa", "eager", "segments"])
def test_loss_and_every_gradient_equal_the_padded_path(attn):
    model = tiny_llama("sdpa" if attn == "segments" else attn)
    if attn == "segments":  # train.py's default: the padded batch below takes the fallback (transformers' sdpa)
        assert segment_attention.use_segments(model)
    examples = micro_batch()
    padded = collators.DataCollatorForSupervisedDataset(Tok())(examples)
    packed = collators.make_collator(Tok(), model.config, max_row_tokens=64)(examples)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # it did remove padding
    assert (packed["labels"] != -100).sum() == (padded["labels"][:, 1:] != -100).sum()
    want_loss, want = loss_and_grads(model, padded)
    got_loss, got = loss_and_grads(model, packed)
    assert torch.allclose(got_loss, want_loss, rtol=1e-5, atol=0)
    for name, g in want.items():
        assert (got[name] - g).norm() <= 1e-5 * g.norm() + 1e-9, name


def test_position_ids_alone_leak_under_sdpa():
    """Why we build a mask: without it the examples in one row see each other and the loss changes."""
    model = tiny_llama("sdpa")
    examples = micro_batch()
    padded_loss = model(**collators.DataCollatorForSupervisedDataset(Tok())(examples)).loss
    leaky = collators.DataCollatorPaddingFree(Tok(), 64, attention="position_ids")(examples)
    assert "attention_mask" not in leaky
    assert not torch.allclose(model(**leaky).loss, padded_loss, rtol=1e-5)  # the bar the masked path meets


def test_flash_attention_gets_position_ids_and_no_mask():
    config = tiny_llama("sdpa").config
    config._attn_implementation = "flash_attention_2"
    batch = collators.make_collator(Tok(), config, 64)(micro_batch())
    assert "attention_mask" not in batch and batch["position_ids"].min() == 0
    assert not collators.make_collator(Tok(), config, 64, padding_free=False).__class__.__name__.endswith("PaddingFree")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attention needs a GPU")
def test_flash_attention_varlen_matches_the_padded_path_on_gpu():
    pytest.importorskip("flash_attn")
    model = tiny_llama("flash_attention_2").to("cuda", torch.bfloat16)
    examples = micro_batch()
    padded = {k: v.cuda() for k, v in collators.DataCollatorForSupervisedDataset(Tok())(examples).items()}
    packed = {k: v.cuda() for k, v in collators.make_collator(Tok(), model.config, 64)(examples).items()}
    assert torch.allclose(model(**packed).loss.float(), model(**padded).loss.float(), rtol=2e-2)  # bf16 kernels


def test_training_runs_log_the_same_losses_with_and_without_padding_free(tiny_llama_dir, tmp_path):
    """The Trainer path end to end, with gradient checkpointing on the padding-free side: same train and eval loss."""
    (tmp_path / "train.json").write_text(json.dumps(make_rows(24, seed=5)))
    (tmp_path / "eval.json").write_text(json.dumps(make_rows(6, seed=6)))

    def run(name, *extra):
        trainer = train.train(
            [
                "--model_name_or_path",
                str(tiny_llama_dir),
                "--data_path",
                str(tmp_path / "train.json"),
                "--eval_data_path",
                str(tmp_path / "eval.json"),
                "--output_dir",
                str(tmp_path / name),
                "--per_device_train_batch_size",
                "6",
                "--max_steps",
                "3",
                "--logging_steps",
                "1",
                "--learning_rate",
                "1e-3",
                "--save_strategy",
                "no",
                "--report_to",
                "none",
                "--model_max_length",
                "128",
                "--dataloader_num_workers",
                "0",
                "--seed",
                "3",
                *extra,
            ]
        )
        logs = trainer.state.log_history
        return [x["loss"] for x in logs if "loss" in x], trainer.evaluate()["eval_loss"]

    padded_losses, padded_eval = run("padded", "--padding_free", "False")
    free_losses, free_eval = run("free", "--padding_free", "True", "--gradient_checkpointing", "True")
    assert len(padded_losses) == 3
    assert free_losses == pytest.approx(padded_losses, rel=1e-4)
    assert free_eval == pytest.approx(padded_eval, rel=1e-4)


def test_the_worked_example_in_the_padding_free_docstring_is_what_it_does():
    import doctest

    class Tokenizer:
        pad_token_id = 0

    globs = dict(DataCollatorPaddingFree=collators.DataCollatorPaddingFree, torch=torch, tokenizer=Tokenizer())
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(collators.DataCollatorPaddingFree, globs=globs):
        runner.run(test)
    assert runner.tries == 5 and runner.failures == 0  # the example's five >>> lines
