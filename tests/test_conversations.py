"""conversations.py: chats rendered prefix by prefix, the labels exactly the assistant turns, truncation by whole
turns, and padding-free collation giving the padded loss."""

import pytest
import torch
from helpers import alpaca_chat_prompt, load_tokenizer, make_rows, original_labels, tiny_llama_config
from transformers import LlamaForCausalLM

from alpaca_trainml.data import alpaca_labels, collators, conversations, dataset, prompts

# a ChatML-like template for the test tokenizers: every turn ends with EOS and a newline
TURNS_TEMPLATE = (
    "{% for m in messages %}{{ '### ' + m.role + '\\n' + m.content + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant\\n' }}{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Summarize the text."},
    {"role": "assistant", "content": "The river counts three apples."},
    {"role": "user", "content": "Give a one-word title."},
    {"role": "user", "content": "Please."},
    {"role": "assistant", "content": "Apples."},
    {"role": "user", "content": "Count the words."},
    {"role": "assistant", "content": "A chef writes a long letter."},
]
ANSWERS = [m["content"] for m in CHAT if m["role"] == "assistant"]


def styled(tokenizer, style, template=None):
    if template is not None:
        tokenizer.chat_template = template
    return prompts.get_style(style).install(tokenizer)


def encode(tokenizer, messages, alpaca):
    stats = conversations.ChatStats()
    style = prompts.get_style("alpaca" if alpaca else "model")
    return conversations.encode_conversation(tokenizer, messages, style, stats), stats


def trained_runs(tokenizer, ids, labels):
    """The decoded text of each maximal run of trained tokens."""
    runs, current = [], []
    for token, label in zip(ids.tolist(), labels.tolist()):
        if label != -100:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]


@pytest.mark.parametrize("which", ["spm_tokenizer_dir", "bpe_tokenizer_dir"])
def test_alpaca_rows_as_chats_get_the_original_ids_and_labels(which, request):
    """A row as [system: input, user: instruction, assistant: output] renders through the Alpaca chat template to
    the Alpaca prompt, so the chat path must reproduce the original labelling token for token."""
    tokenizer = styled(load_tokenizer(request.getfixturevalue(which), max_length=256), "alpaca")
    rows = make_rows(30, seed=11)
    sources, targets = alpaca_labels.build_example_texts(rows, tokenizer.eos_token)
    want_ids, want_labels = original_labels(sources, targets, tokenizer)
    for row, ids, labels in zip(rows, want_ids, want_labels):
        chat = [{"role": "system", "content": row["input"]}] if row["input"] else []
        chat += [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["output"]}]
        ((got_ids, got_labels),), _ = encode(tokenizer, chat, alpaca=True)
        assert torch.equal(got_ids, ids) and torch.equal(got_labels, labels)


def test_a_model_template_trains_every_answer_and_nothing_else(bpe_tokenizer_dir):
    tokenizer = styled(load_tokenizer(bpe_tokenizer_dir, max_length=512), "model", TURNS_TEMPLATE)
    ((ids, labels),), stats = encode(tokenizer, CHAT, alpaca=False)
    eos = tokenizer.eos_token
    assert trained_runs(tokenizer, ids, labels) == [a + eos for a in ANSWERS]  # not the newline the template adds
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert ids.tolist() == tokenizer(full, add_special_tokens=False)["input_ids"]  # one example: the whole chat
    masked = tokenizer.decode(ids[labels == -100])
    assert "Answer briefly." in masked and "Please." in masked and not any(a in masked for a in ANSWERS)
    assert (stats.conversations, stats.examples, stats.answers, stats.answers_dropped) == (1, 1, 3, 0)


def test_the_alpaca_style_trains_each_answer_on_the_prompt_serve_py_sends(spm_tokenizer_dir):
    tokenizer = styled(load_tokenizer(spm_tokenizer_dir, max_length=512), "alpaca")
    examples, stats = encode(tokenizer, CHAT, alpaca=True)
    assert len(examples) == stats.examples == 3  # the history sits in each prompt's Input: one example an answer
    for (ids, labels), k in zip(examples, [i for i, m in enumerate(CHAT) if m["role"] == "assistant"]):
        served = prompts.format_prompt(*alpaca_chat_prompt(CHAT[:k]))
        n = len(tokenizer(served)["input_ids"])  # the prompt as serve.py encodes it, BOS and all
        assert ids.tolist() == tokenizer(served + CHAT[k]["content"] + "</s>")["input_ids"]  # as an Alpaca row
        assert bool((labels[:n] == -100).all()) and torch.equal(labels[n:], ids[n:])  # the answer and EOS only


def test_truncation_drops_whole_turns_and_cuts_only_a_first_answer():
    spans = [(5, 10), (15, 20), (25, 30)]
    assert conversations.truncate(list(range(32)), spans, True, 32) == (list(range(32)), spans, 0, False)
    assert conversations.truncate(list(range(32)), spans, True, 22) == (list(range(20)), spans[:2], 1, False)
    assert conversations.truncate(list(range(32)), spans, True, 8) == (list(range(8)), [(5, 8)], 2, True)
    assert conversations.truncate(list(range(32)), spans, False, 8) == (None, [], 3, False)  # a later turn's example
    assert conversations.truncate(list(range(32)), spans, True, 6) == (None, [], 3, False)  # < 2 answer tokens fit


def test_truncated_chats_are_counted_and_logged(bpe_tokenizer_dir, caplog):
    tokenizer = styled(load_tokenizer(bpe_tokenizer_dir, max_length=512), "model", TURNS_TEMPLATE)
    ((ids, labels),), _ = encode(tokenizer, CHAT, alpaca=False)
    first_end = int((labels != -100).nonzero()[0]) + 3  # three tokens into the first answer
    tokenizer.model_max_length = len(ids) - 2  # the last answer no longer fits
    ((short, short_labels),), stats = encode(tokenizer, CHAT, alpaca=False)
    assert stats.answers_dropped == 1 and trained_runs(tokenizer, short, short_labels) == [
        a + tokenizer.eos_token for a in ANSWERS[:2]
    ]
    tokenizer.model_max_length = first_end
    ((cut, cut_labels),), stats = encode(tokenizer, CHAT, alpaca=False)
    assert (stats.answers_dropped, stats.answers_cut, len(cut)) == (2, 1, first_end)
    with caplog.at_level("WARNING"):
        conversations.log_stats("chats.json", stats, first_end)
    assert "2 assistant turn(s) were dropped whole" in caplog.text and "1 first answer(s) were cut" in caplog.text


def test_a_template_that_renders_the_last_answer_differently_is_refused(bpe_tokenizer_dir):
    differs = TURNS_TEMPLATE.replace("{% if add_generation_prompt %}", "{% if add_generation_prompt %}{{ '>' }}")
    tokenizer = styled(load_tokenizer(bpe_tokenizer_dir), "model", differs)
    with pytest.raises(ValueError, match="renders an answer differently.*--prompt_style alpaca"):
        encode(tokenizer, CHAT, alpaca=False)


@pytest.mark.parametrize("style", ["alpaca", "model"])
def test_padding_free_chat_batches_give_the_padded_loss_and_gradients(bpe_tokenizer_dir, style):
    tokenizer = styled(load_tokenizer(bpe_tokenizer_dir, max_length=512), style, TURNS_TEMPLATE)
    chats = [CHAT, CHAT[1:3], CHAT[:6], CHAT[3:]]
    data = dataset.SupervisedDataset("chats", tokenizer, rows=[{"messages": c} for c in chats])
    assert len(data) == (8 if style == "alpaca" else 4)  # alpaca: one example per answer (3 + 1 + 2 + 2)
    examples = [data[i] for i in range(len(data))]
    torch.manual_seed(0)
    config = tiny_llama_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    padded = loss_and_grads(collators.DataCollatorForSupervisedDataset(tokenizer)(examples))
    free = loss_and_grads(collators.make_collator(tokenizer, model.config, 160)(examples))
    assert torch.allclose(free[0], padded[0], rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(free[1], padded[1]))


def test_a_chat_the_template_refuses_is_a_value_error_naming_it(bpe_tokenizer_dir):
    tokenizer = styled(load_tokenizer(bpe_tokenizer_dir), "alpaca")  # it renders prompts only: no final answer
    with pytest.raises(ValueError, match="cannot render this chat: the last message must come from the user"):
        encode(tokenizer, CHAT, alpaca=False)
