"""generation/routes/: the steps every route shares (settings and prompt checks as 400s, engine failures as 503/500,
the one INFO line of a client that leaves) and the OpenAI response head, called directly with a stand-in model: no
model is built and no server runs. The routes over a real model and server are tested in test_serve.py."""

import asyncio
import logging

import pytest
from pydantic import ValidationError

from alpaca_trainml.generation.decoding import GenParams
from alpaca_trainml.generation.engine import EngineStopped, QueueFullError, RequestCancelled
from alpaca_trainml.generation.model import ContextLengthError, PromptTooLongError
from alpaca_trainml.generation.protocol import ApiError, ChatBody, CompletionBody
from alpaca_trainml.generation.routes import common
from alpaca_trainml.generation.routes.openai_api import response_head


class StandIn:
    """What prepare() asks of an InstructModel: its limits and check_fits."""

    context_window, max_prompt_tokens = 64, 16

    def check_fits(self, n_prompt, max_tokens):
        if n_prompt + max_tokens > self.context_window:
            raise ContextLengthError(f"{n_prompt} + {max_tokens} tokens do not fit {self.context_window}")


def test_prepare_gives_the_prompt_ids_and_limits_openai_prompts_to_the_room_left():
    limits_seen = []

    def encode(limit):
        limits_seen.append(limit)
        return [1, 2, 3]

    params = GenParams(max_tokens=10)
    assert common.prepare(StandIn(), params, False, encode) == [1, 2, 3]
    common.prepare(StandIn(), params, True, encode, openai=True)
    assert limits_seen == [None, 54]  # /instruct: the training length; OpenAI, truncating: 64 - 10 tokens of room


@pytest.mark.parametrize(
    "params, encode_error, code, needle",
    [
        (GenParams(top_p=0), None, None, "top_p"),
        (GenParams(max_tokens=62), None, "context_length_exceeded", "do not fit 64"),  # 3 + 62 > 64
        (GenParams(max_tokens=8), PromptTooLongError("the prompt is 99 tokens"), "prompt_too_long", "99 tokens"),
    ],
)
def test_prepare_answers_every_problem_with_a_400_that_names_it(params, encode_error, code, needle):
    def encode(limit):
        if encode_error:
            raise encode_error
        return [1, 2, 3]

    with pytest.raises(ApiError) as e:
        common.prepare(StandIn(), params, False, encode)
    assert e.value.status == 400 and e.value.body["error"]["code"] == code and needle in str(e.value)


def test_a_prompt_past_the_training_length_is_served_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        common.prepare(StandIn(), GenParams(max_tokens=8), False, lambda limit: list(range(20)), openai=True)
    assert "a prompt of 20 tokens: longer than the 16 this model was trained on" in caplog.text


@pytest.mark.parametrize(
    "error, status",
    [(QueueFullError("full"), 503), (EngineStopped("stopping"), 503), (RequestCancelled("left"), 499)]
    + [(RuntimeError("boom"), 500), (ApiError(418, "as is"), 418)],
)
def test_api_error_maps_what_went_wrong_to_a_status(error, status):
    assert common.api_error(error).status == status


def test_a_client_that_leaves_is_one_info_line_and_a_499(caplog, monkeypatch):
    class Request:
        method, url = "POST", type("Url", (), {"path": "/instruct"})()

        async def is_disconnected(self):
            return True

    async def leave(engine, jobs, is_disconnected, poll_s):
        assert await is_disconnected()
        raise RequestCancelled("the client closed the request")

    monkeypatch.setattr(common, "wait_for", leave)
    with caplog.at_level(logging.INFO), pytest.raises(ApiError) as e:
        asyncio.run(common.answers(None, [], Request()))
    assert e.value.status == 499
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "POST /instruct: the client left before the answer was finished; stopped")
    ]


def test_response_head_refuses_another_model_and_the_request_models_unsupported_settings():
    head, adapter = response_head(CompletionBody(prompt="x"), "served")
    assert adapter is None and head["model"] == "served"
    assert head["id"].startswith("cmpl-") and isinstance(head["created"], int)
    with pytest.raises(ApiError) as e:
        response_head(CompletionBody(prompt="x", model="gpt-4"), "served")
    assert e.value.status == 404 and e.value.body["error"]["code"] == "model_not_found"
    for body, field in [
        (dict(messages=[{"role": "user", "content": "Hi"}], n=2), "n"),
        (dict(logprobs=True), "logprobs"),
    ]:
        with pytest.raises(ValidationError, match=field):
            ChatBody.model_validate(body)
    with pytest.raises(ValidationError, match="echo"):
        CompletionBody.model_validate(dict(prompt="x", echo=True))
