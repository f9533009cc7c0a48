"""Structured output (the OpenAI routes' `response_format`): each constrained row of the running batch carries a
grammar matcher, and before sampling its logits lose every token the grammar cannot take next. The answer is then
JSON that follows the schema, token by token, under greedy decoding and sampling alike.

The grammar library is llguidance (benchmarks/structured_output.py measured the choice on a CPU): it compiles a JSON
schema in milliseconds and computes a row's mask in tens of microseconds, against a decode step of milliseconds.
outlines-core compiles a schema into a token automaton up front, seconds to a minute for a bounded string
(`maxLength`), and passes keywords it does not implement; llguidance refuses those, which serve.py answers with a
400. xgrammar 0.2.9 installs triton, a GPU compiler, into a CPU product.

The JSON has no free whitespace (`{"a": 1, "b": [2, 3]}`, json.dumps's separators): a small model given the choice
can emit blank lines until max_tokens. A row ends as soon as its JSON is complete. An answer that runs into max_tokens
(or the context window) ends with finish_reason "length" and a prefix of valid JSON, as OpenAI's does. Stop strings
still apply, and can cut the JSON too. Speculative decoding drafts nothing for a constrained row (its pending token is
still checked in the verify step, masked like any other)."""

import json
import logging
import threading

import numpy as np
import torch

logger = logging.getLogger(__name__)

# over the schema's own "x-guidance" options: lenient would pass keywords it does not implement, unchecked
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}
ANY_OBJECT = {"type": "object"}  # what {"type": "json_object"} asks for: any JSON object


class GrammarError(ValueError):
    """A JSON schema the grammar library refuses (serve.py answers 400, code invalid_json_schema)."""


class UnwritableError(ValueError):
    """The grammar took none of the tokens the model could write next, before its JSON was complete: the tokenizer
    cannot spell what the schema needs (a vocabulary without `"`, say). The answer fails (serve.py answers 400, code
    response_format_unwritable) rather than end as incomplete JSON with finish_reason "stop"."""


def format_schema(response_format):
    """The JSON schema a request body's response_format asks for (a dict), or None for free text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return ANY_OBJECT
    schema = response_format.json_schema.schema_
    return ANY_OBJECT if schema is None else schema


class Grammars:
    """One model's grammar compiler. The tokenizer as llguidance reads it is built on first use (about 0.5 s for a
    49k vocabulary) and kept."""

    def __init__(self, tokenizer, eos_ids, tokenizer_lock=None):
        """tokenizer_lock: held while the tokenizer is read."""
        self.hf_tokenizer, self.eos_ids = tokenizer, list(eos_ids)
        self._tokenizer, self._lock = None, threading.Lock()
        self._tokenizer_lock = tokenizer_lock or threading.Lock()

    def tokenizer(self):
        with self._lock, self._tokenizer_lock:
            if self._tokenizer is None:
                import llguidance.hf

                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(
                        self.hf_tokenizer, n_vocab=len(self.hf_tokenizer), eos_token=self.eos_ids
                    )
                except (ValueError, TypeError, AttributeError) as e:  # a tokenizer without a `tokenizers` backend
                    raise GrammarError(f"this model's tokenizer cannot be read by llguidance: {e}") from e
            return self._tokenizer

    def compile(self, schema):
        """A factory of fresh matchers (one per answer) for a JSON schema; GrammarError says what is wrong with it."""
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise GrammarError(f"response_format: the JSON schema cannot be read: {e}") from e
        tokenizer = self.tokenizer()
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if not error:  # some faults show only at the first mask (a $ref that refers only to itself)
            check = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
            check.compute_bitmask()
            error = check.get_error()
        if error:
            raise GrammarError(f"response_format: the JSON schema is not supported: {_first_line(error)}")
        return lambda: Matcher(llguidance.LLMatcher(tokenizer, grammar, log_level=0), tokenizer.vocab_size)


def _first_line(message, limit=300):
    line = message.strip().splitlines()[0] if message.strip() else message
    return line[:limit]


class Matcher:
    """One answer's place in its grammar."""

    def __init__(self, matcher, vocab):
        self.matcher, self.words = matcher, (vocab + 31) // 32  # the tokenizer's vocabulary, in 32-bit words

    def fill_mask(self, words):
        """Write the bitmask of allowed next tokens into `words`, a contiguous int32 tensor (self.words,): token t is
        bit t % 32 of word t // 32."""
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def consume(self, token):
        """Feed the sampled token; False if the grammar refused it (it cannot, once masked)."""
        ok = self.matcher.consume_token(token)
        if not ok:
            logger.warning("a constrained row's token %d was refused: %s", token, self.matcher.get_error()[:300])
        return ok

    def complete(self):
        """Nothing more can follow: the JSON has ended."""
        return self.matcher.is_stopped()

    def accepting(self):
        """The text so far is a whole answer under the grammar (it may end here)."""
        return self.matcher.is_accepting()


def allowed_tokens(matchers, vocab):
    """(len(matchers), vocab) bool: the tokens each matcher's grammar takes next. vocab: the logits' width, which
    may differ from the tokenizer's (a token past the tokenizer's is never allowed)."""
    words = max(m.words for m in matchers)
    masks = torch.zeros((len(matchers), words), dtype=torch.int32)
    for i, m in enumerate(matchers):
        m.fill_mask(masks[i, : m.words])
    # little-endian bytes, bits unpacked least significant first: token t is bit t of the row
    bits = torch.from_numpy(np.unpackbits(masks.numpy().view(np.uint8), axis=-1, bitorder="little"))
    if bits.shape[1] < vocab:
        bits = torch.nn.functional.pad(bits, (0, vocab - bits.shape[1]))
    return bits[:, :vocab].bool()


def constrain(rows, logits, eos_ids):
    """logits (rows, vocab) with every token a constrained row's grammar refuses at -inf (a new tensor; the same one
    when no row is constrained). A row whose grammar takes nothing (it failed) may only end: its end-of-text tokens.
    Never a row all -inf: sampling would fail for the whole batch."""
    at = [i for i, r in enumerate(rows) if r.job.grammar is not None]
    if not at:
        return logits
    vocab = logits.shape[-1]
    allowed = allowed_tokens([rows[i].job.grammar for i in at], vocab)
    stuck = (~allowed.any(-1)).nonzero().squeeze(-1)
    if len(stuck) and eos_ids:
        allowed[stuck[:, None], torch.tensor(eos_ids, dtype=torch.long)] = True
    elif len(stuck):  # no end-of-text token: any token, which the grammar then refuses, and the row ends
        allowed[stuck] = True
    keep = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
    keep[at] = allowed.to(logits.device)
    return logits.masked_fill(~keep, float("-inf"))
