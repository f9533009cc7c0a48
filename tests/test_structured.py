"""generation/structured.py: response_format. Under a JSON schema every answer parses and validates (checked with
jsonschema), greedy and sampled, streamed or not, with free rows in the same batch and with speculative decoding on;
an answer cut off by max_tokens ends with finish_reason "length" and a prefix of valid JSON; a schema the grammar
library refuses is one 400 with our error body."""

import json

import pytest
import torch
from helpers import build_tiny_llama, call_app

from alpaca_trainml.generation.batch import DecodeBatch, Job, run_to_end
from alpaca_trainml.generation.decoding import GenParams
from alpaca_trainml.generation.speculative import Lookup
from alpaca_trainml.generation.structured import GrammarError, Grammars, allowed_tokens, constrain
from inference import InstructModel
from serve import create_app

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

# Bounded: every answer fits in MAX_TOKENS whatever a random model prefers (at most ~110 characters, 1 token each),
# so the tests below check the JSON itself, not how long a tiny random model goes on.
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "kind": {"enum": ["red", "green"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
    },
    "required": ["ok", "n", "kind", "tags"],
    "additionalProperties": False,
}
MAX_TOKENS = 200
CHAT = [{"role": "user", "content": "Give me a record."}]


@pytest.fixture(scope="module")
def model(bpe_tokenizer_dir, tmp_path_factory):
    """The tests' tiny Llama over the byte-level BPE tokenizer: the sentencepiece one has no token for '"'."""
    return InstructModel(str(build_tiny_llama(bpe_tokenizer_dir, tmp_path_factory.mktemp("bpe_llama"))))


@pytest.fixture(scope="module")
def grammars(model):
    return Grammars(model.tokenizer, model.eos_ids, model.tokenizer_lock)


def valid(text, schema=SCHEMA):
    jsonschema.validate(json.loads(text), schema)
    return True


class FixedMatcher:
    """A matcher whose grammar takes the given token ids."""

    def __init__(self, ids, vocab=64):
        self.ids, self.words = ids, (vocab + 31) // 32

    def fill_mask(self, words):
        for i in self.ids:
            words[i // 32] |= torch.tensor(1 << (i % 32)).to(torch.int32)


class FakeRow:
    def __init__(self, grammar):
        self.job = Job([1], GenParams(), grammar=grammar)


def test_masks_unpack_bit_by_bit_and_leave_free_rows_alone():
    allowed = allowed_tokens([FixedMatcher([0, 31, 32, 69], vocab=70)], 70)  # across word edges; a partial last word
    assert allowed.nonzero()[:, 1].tolist() == [0, 31, 32, 69]
    wider = allowed_tokens([FixedMatcher([3, 63])], 100)  # logits wider than the tokenizer: the rest never allowed
    assert wider.shape == (1, 100) and wider.nonzero()[:, 1].tolist() == [3, 63]
    assert allowed_tokens([FixedMatcher([3, 63])], 40).nonzero()[:, 1].tolist() == [3]  # narrower: cut
    logits = torch.zeros(3, 70)
    rows = [FakeRow(None), FakeRow(FixedMatcher([5, 40])), FakeRow(FixedMatcher([]))]
    out = constrain(rows, logits, eos_ids=[2])
    assert torch.equal(out[0], logits[0])  # a free row keeps every token
    assert torch.isfinite(out[1]).nonzero().squeeze(-1).tolist() == [5, 40]
    assert torch.isfinite(out[2]).nonzero().squeeze(-1).tolist() == [2]  # a grammar that takes nothing may only end
    assert torch.isfinite(constrain(rows, logits, eos_ids=[])[2]).all()  # no end-of-text token: never all -inf
    assert constrain(rows[:1], logits, [2]) is logits  # no constrained row: no copy


def test_bad_schemas_are_refused_with_the_reason(grammars):
    with pytest.raises(GrammarError, match="dependentRequired"):
        grammars.compile({"type": "object", "dependentRequired": {"a": ["b"]}})  # a keyword llguidance lacks
    with pytest.raises(GrammarError):
        grammars.compile({"type": "integer", "minimum": 5, "maximum": 2})  # nothing satisfies it
    with pytest.raises(GrammarError, match="dependentRequired"):  # the schema cannot make llguidance lenient
        grammars.compile({"x-guidance": {"lenient": True}, "dependentRequired": {"a": ["b"]}})
    with pytest.raises(GrammarError):  # shows only when a matcher starts
        grammars.compile({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"})
    assert callable(grammars.compile({"type": "object"}))


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_constrained_and_free_rows_share_a_batch_and_every_answer_validates(model, grammars, temperature):
    matchers = grammars.compile(SCHEMA)
    prompts = [model.encode_instruction(p) for p in ("Name a colour.", "List two fruits.", "Why?")]
    params = GenParams(max_tokens=MAX_TOKENS, temperature=temperature, top_p=1.0)
    free = GenParams(max_tokens=12, temperature=0)
    torch.manual_seed(0)
    jobs = [Job(ids, params, grammar=matchers()) for ids in prompts] + [Job(prompts[0], free)]
    *constrained, mixed = run_to_end(model, jobs)
    assert all(c.finish_reason == "stop" and valid(c.text) for c in constrained), constrained
    assert mixed == run_to_end(model, [Job(prompts[0], free)])[0]  # the free row is the one it is alone


def test_an_answer_cut_by_max_tokens_says_length_and_is_a_prefix_of_valid_json(model, grammars):
    matchers = grammars.compile(SCHEMA)
    (cut,) = run_to_end(
        model, [Job(model.encode_instruction("Hi"), GenParams(max_tokens=10, temperature=0), grammar=matchers())]
    )
    assert cut.finish_reason == "length" and cut.completion_tokens == 10
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.text)
    check = matchers()  # the same text, token by token, is one the grammar still takes
    assert all(check.consume(t) for t in model.tokenizer(cut.text, add_special_tokens=False)["input_ids"])
    assert cut.text.startswith('{"ok": ')  # whitespace fixed: json.dumps's separators


def test_speculative_decoding_drafts_nothing_for_constrained_rows(model, grammars):
    matchers = grammars.compile(SCHEMA)
    ids = model.encode_instruction("Say it again: red red red red red red red red")
    model.speculative = Lookup()
    try:
        batch = DecodeBatch(model)
        jobs = [Job(ids, GenParams(max_tokens=MAX_TOKENS, temperature=0), grammar=matchers())]
        jobs.append(Job(ids, GenParams(max_tokens=48, temperature=0)))  # a free row that drafts
        batch.admit(jobs)
        while batch.rows:
            batch.step()
    finally:
        model.speculative = None
    assert batch.drafted > 0  # the verify step ran, with the constrained row's pending token masked in it
    assert valid(jobs[0].future.result().text)


def sse_text(response, chat):
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    if chat:
        return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    return "".join(e["choices"][0]["text"] for e in events if e["choices"])


def test_the_openai_routes_answer_json_that_validates_streamed_or_not(model):
    schema_format = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA, "strict": True}}
    base = dict(max_tokens=MAX_TOKENS, temperature=1.0, response_format=schema_format)
    chat = dict(base, messages=CHAT)
    r = call_app(
        create_app(model),
        ("POST", "/v1/chat/completions", dict(json=chat)),
        ("POST", "/v1/chat/completions", dict(json=dict(chat, stream=True))),
        ("POST", "/v1/completions", dict(json=dict(base, prompt=["A record:", "Another:"]))),
        ("POST", "/v1/completions", dict(json=dict(base, prompt="A record:", stream=True))),
        ("POST", "/v1/completions", dict(json=dict(base, prompt="Any:", response_format={"type": "json_object"}))),
    )
    assert [x.status_code for x in r] == [200] * 5, [x.text for x in r]
    assert valid(r[0].json()["choices"][0]["message"]["content"])
    assert valid(sse_text(r[1], chat=True))
    assert all(valid(c["text"]) for c in r[2].json()["choices"])
    assert valid(sse_text(r[3], chat=False))
    any_object = r[4].json()["choices"][0]
    assert any_object["text"].startswith("{")
    assert any_object["finish_reason"] == "length" or isinstance(json.loads(any_object["text"]), dict)


def test_bad_response_formats_are_one_400_with_our_error_body(model):
    def body(fmt, **kw):
        return dict(json=dict(messages=CHAT, max_tokens=4, response_format=fmt, **kw))

    unsupported = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"dependentRequired": {"a": ["b"]}}}}
    not_object = {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}
    r = call_app(
        create_app(model),
        ("POST", "/v1/chat/completions", body(unsupported)),
        ("POST", "/v1/chat/completions", body(not_object)),
        ("POST", "/v1/chat/completions", body({"type": "xml"})),
        ("POST", "/v1/chat/completions", body({"type": "json_object"}, num_beams=2)),
    )
    assert [x.status_code for x in r] == [400] * 4
    errors = [x.json()["error"] for x in r]
    assert errors[0]["code"] == "invalid_json_schema" and "dependentRequired" in errors[0]["message"]
    assert errors[0]["param"] == "response_format"
    assert "response_format" in errors[1]["message"] and "response_format" in errors[2]["message"]
    assert errors[3]["code"] == "response_format_with_beams"


def test_json_a_tokenizer_cannot_spell_is_an_error_not_an_answer_that_says_it_stopped(tiny_llama_dir):
    """The sentencepiece test tokenizer has no '"': after '{' the schema's required key cannot be written. The
    answer fails with a 400 (an error event once streaming), never '{' with finish_reason "stop"."""
    fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA}}
    body = dict(prompt="A record:", max_tokens=20, response_format=fmt)
    r = call_app(
        create_app(InstructModel(str(tiny_llama_dir))),
        ("POST", "/v1/completions", dict(json=body)),
        ("POST", "/v1/completions", dict(json=dict(body, stream=True))),
    )
    assert r[0].status_code == 400 and r[0].json()["error"]["code"] == "response_format_unwritable"
    events = [json.loads(line[6:]) for line in r[1].text.splitlines() if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "response_format_unwritable"
    assert all(c["finish_reason"] is None for e in events[:-1] for c in e.get("choices", []))


def test_the_openapi_schema_declares_response_format(model):
    (r,) = call_app(create_app(model), ("GET", "/openapi.json", {}), generate=False)
    bodies = r.json()["components"]["schemas"]
    for body in ("CompletionBody", "ChatBody"):
        kinds = bodies[body]["properties"]["response_format"]["anyOf"][0]["discriminator"]["mapping"]
        assert sorted(kinds) == ["json_object", "json_schema", "text"], body
    spec = bodies["JsonSchemaSpec"]
    assert spec["required"] == ["name"] and spec["properties"]["schema"]["anyOf"][0]["type"] == "object"
    assert "invalid_json_schema" in r.json()["paths"]["/v1/chat/completions"]["post"]["responses"]["400"]["description"]
