"""Chats to training examples: the loss on every assistant turn and nothing else, cut only at whole turns.

A conversation is rendered through its prompt style (prompts.py) prefix by prefix: for the k-th message, an
assistant's, the prompt is the style's render of messages[:k] with the generation prompt, which is exactly what a
server sends the model before that answer. The style says what the answer adds after it and how much of that trains
(PromptStyle.answer):
- the Alpaca style: the answer and EOS, as Alpaca rows end. Its prompt holds the earlier turns in the Input, so a
  prompt is not an extension of the previous one: each answer becomes an example of its own;
- a model's own template (ChatML, ...): what the template adds when the answer is appended, up to and with its
  end-of-turn token (ChatML's newline after it is not trained). Each prompt extends the text so far, so one example
  trains every answer.
The text is tokenized once; a span's token boundaries are the token counts of the text before them.
"""

import logging
from dataclasses import dataclass, field

import torch

from alpaca_trainml.data.special_tokens import IGNORE_INDEX

logger = logging.getLogger(__name__)


@dataclass
class RenderedExample:
    text: str
    spans: list  # [(start, end)] character spans of the answers, in order: the trained text
    first: bool  # its first span is the conversation's first answer


@dataclass
class ChatStats:
    conversations: int = 0
    examples: int = 0
    answers: int = 0
    answers_dropped: int = 0  # whole assistant turns dropped from the end at model_max_length
    answers_cut: int = 0  # first answers cut mid-way because nothing shorter fits
    notes: list = field(default_factory=list)


def render_conversation(tokenizer, messages, style):
    """[RenderedExample]: the conversation's text(s) with each answer's character span (module docstring). A prompt
    that extends the text so far (a model's own template) adds its answer to the same example."""
    examples = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = style.render(tokenizer, messages[:k])
        answer, trained = style.answer(tokenizer, messages, k, prompt)
        span = (len(prompt), len(prompt) + trained)
        if examples and prompt.startswith(examples[-1].text):
            examples[-1].text = prompt + answer
            examples[-1].spans.append(span)
        else:
            examples.append(RenderedExample(prompt + answer, [span], first=not examples))
    return examples


def tokenize_spans(tokenizer, text, spans):
    """(ids, token spans): the text's token ids and each character span as [start, end) token indices, where a
    boundary at character c falls after len(tokenize(text[:c])) tokens: the original's rule for the prompt (mask
    len(tokenize(source)) tokens), applied at every boundary. Chat templates end turns with special tokens, where
    tokens cannot straddle a boundary."""

    def count(c):
        return (
            len(tokenizer(text[:c], add_special_tokens=False, verbose=False)["input_ids"])
            if c < len(text)
            else len(ids)
        )

    # verbose=False: no "longer than the maximum" warning; truncate() cuts by whole turns and counts them
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    token_spans = [(count(a), count(b)) for a, b in spans]
    return ids, [(a, b) for a, b in token_spans if b > a]


def truncate(ids, token_spans, first, max_length):
    """(ids, token spans, answers dropped, cut) within max_length tokens. Whole answers go from the end; when not
    even the first answer fits, the conversation's first answer is cut at the limit (and counted), a later turn's
    example is dropped (ids None)."""
    if len(ids) <= max_length:
        return ids, token_spans, 0, False
    kept = [s for s in token_spans if s[1] <= max_length]
    if kept:
        return ids[: kept[-1][1]], kept, len(token_spans) - len(kept), False
    start = token_spans[0][0]
    if first and start < max_length - 1:  # at least one answer token trains
        return ids[:max_length], [(start, max_length)], len(token_spans) - 1, True
    return None, [], len(token_spans), False


def encode_conversation(tokenizer, messages, style, stats):
    """[(input_ids, labels)] tensors for one conversation; labels are IGNORE_INDEX outside the answers."""
    out = []
    stats.conversations += 1
    for example in render_conversation(tokenizer, messages, style):
        ids, token_spans = tokenize_spans(tokenizer, example.text, example.spans)
        stats.answers += len(token_spans)
        ids, token_spans, dropped, cut = truncate(ids, token_spans, example.first, tokenizer.model_max_length)
        stats.answers_dropped += dropped
        stats.answers_cut += cut
        if ids is None:
            continue
        labels = torch.full((len(ids),), IGNORE_INDEX, dtype=torch.long)
        ids = torch.tensor(ids, dtype=torch.long)
        for a, b in token_spans:
            labels[a:b] = ids[a:b]
        out.append((ids, labels))
    stats.examples += len(out)
    return out


def log_stats(name, stats, max_length):
    logger.info(
        "%s: %d conversations -> %d examples, %d assistant turns trained",
        name,
        stats.conversations,
        stats.examples,
        stats.answers - stats.answers_dropped,
    )
    if stats.answers_dropped or stats.answers_cut:
        logger.warning(
            "%s: at model_max_length=%d, %d assistant turn(s) were dropped whole from the end of their conversation "
            "and %d first answer(s) were cut mid-way (nothing shorter fit); raise --model_max_length to keep them",
            name,
            max_length,
            stats.answers_dropped,
            stats.answers_cut,
        )
