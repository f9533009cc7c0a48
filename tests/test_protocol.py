"""protocol.py: message text, request settings, error messages and the OpenAI stream events. Pure
functions, no model."""

import asyncio

import pytest

from alpaca_trainml.generation.decoding import Completion, GenParams
from alpaca_trainml.generation.protocol import (
    ChatMessage,
    CompletionBody,
    make_params,
    message_text,
    openai_events,
    sse_response,
    usage,
    validation_message,
)


def m(role, content):
    return ChatMessage.model_construct(role=role, content=content)  # unchecked: the mapping's own checks are tested


def test_message_text_joins_text_parts_and_refuses_others():
    assert message_text(m("user", [{"type": "text", "text": "Name "}, {"type": "text", "text": "a colour."}])) == (
        "Name a colour."
    )
    assert message_text(m("user", None)) == ""
    with pytest.raises(ValueError, match="image_url"):
        message_text(m("user", [{"type": "image_url", "image_url": {}}]))


def test_make_params_takes_defaults_and_one_stop_string():
    body = CompletionBody(prompt="x", temperature=0, stop="###")
    assert make_params(body, 16, body.stop) == GenParams(max_tokens=16, temperature=0, top_p=1.0, stop=("###",))


def test_validation_message_names_each_field():
    errors = [
        {"loc": ("body", "max_tokens"), "msg": "Input should be a valid integer"},
        {"loc": ("body",), "msg": "Field required"},
    ]
    assert validation_message(errors) == "max_tokens: Input should be a valid integer; body: Field required"


def test_openai_stream_events_with_usage():
    async def items():
        for piece in [" Hello", " world"]:
            yield piece
        yield Completion(" Hello world", prompt_tokens=5, completion_tokens=3, finish_reason="stop")

    async def collect():
        return [e async for e in openai_events([items()], {"id": "c"}, True, include_usage=True)]

    events = asyncio.run(collect())
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"].get("content") for e in events[1:3]] == ["Hello", " world"]  # chat: lstripped
    assert events[3]["choices"][0]["finish_reason"] == "stop"
    assert events[4] == {
        "id": "c",
        "choices": [],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 3,
            "total_tokens": 8,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }


def test_a_stream_gives_the_event_loop_a_turn_between_events():
    """A callback the loop schedules (the server noticing that its client left) runs before the next event is
    written, even when every event is already waiting: otherwise queued tokens pile into a closed socket."""

    async def run():
        async def events():
            for i in range(3):
                yield {"i": i}

        seen, chunks = [], []
        body = sse_response(events(), [], to_error=None).body_iterator
        async for chunk in body:
            chunks.append(chunk)
            asyncio.get_running_loop().call_soon(lambda: seen.append(len(chunks)))  # chunks made when it ran
        return seen, chunks

    seen, chunks = asyncio.run(run())
    assert chunks[-1] == "data: [DONE]\n\n" and len(chunks) == 4
    assert seen[:3] == [1, 2, 3]  # each callback ran before the following chunk was made (not [4, 4, 4])


def test_usage_sums_the_answers_and_their_cached_prompt_tokens():
    answers = [Completion("a", 5, 2, "stop", cached_tokens=4), Completion("b", 7, 3, "length")]
    assert usage(answers) == {
        "prompt_tokens": 12,
        "completion_tokens": 5,
        "total_tokens": 17,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
