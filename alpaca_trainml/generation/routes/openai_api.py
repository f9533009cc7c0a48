"""The OpenAI-compatible routes: GET /v1/models, POST /v1/completions and /v1/chat/completions (`stream: true`
answers with server-sent events). A chat is prompted through the checkpoint's own chat template (its prompt style,
InstructModel.encode_chat), as vLLM and llama.cpp prompt it."""

import time
import uuid
from functools import partial

from fastapi import Request

from alpaca_trainml.generation.decoding import GenParams
from alpaca_trainml.generation.engine import Job
from alpaca_trainml.generation.protocol import (
    ApiError,
    ChatBody,
    CompletionBody,
    make_params,
    message_text,
    openai_events,
    sse_response,
    usage,
)
from alpaca_trainml.generation.routes.common import answers, api_error, prepare, streams

OPENAI_MAX_TOKENS = 16  # the OpenAI completions default when max_tokens is left out


def response_head(body, name, unsupported):
    """id, created and model of an answer; a 404 for another model's name, a 400 for a setting we do not support.

    unsupported: [(key, value, the only value we take)]."""
    if body.model and body.model != name:
        raise ApiError(
            404,
            f"The model {body.model!r} does not exist; this server serves {name!r} (see GET /v1/models)",
            param="model",
            code="model_not_found",
        )
    for key, value, ok in [("n", body.n, 1), *unsupported]:
        if value != ok:
            raise ApiError(400, f"{key}={value!r} is not supported here; leave it out", param=key)
    return dict(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=name)


def add_routes(app, model, engine, name):
    @app.get("/v1/models")
    async def models():
        card = dict(id=name, object="model", created=0, owned_by="alpaca", max_model_len=model.context_window)
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        unsupported = [("echo", body.echo, False), ("logprobs", body.logprobs, None)]
        head = dict(response_head(body, name, unsupported), object="text_completion")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt is an empty list", param="prompt")
        params = make_params(body, OPENAI_MAX_TOKENS, body.stop)
        encodes = [partial(model.encode, p, body.truncate) for p in prompts]  # each: limit -> the prompt's ids
        jobs = [Job(prepare(model, params, body.truncate, encode, openai=True), params) for encode in encodes]
        if body.stream:
            include = bool((body.stream_options or {}).get("include_usage"))
            return sse_response(openai_events(streams(engine, jobs), head, False, include), jobs, api_error)
        results = await answers(engine, jobs, request)
        choices = [
            dict(text=r.text, index=i, logprobs=None, finish_reason=r.finish_reason) for i, r in enumerate(results)
        ]
        return dict(head, choices=choices, usage=usage(results))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        head = dict(response_head(body, name, [("logprobs", bool(body.logprobs), False)]), object="chat.completion")
        head["id"] = head["id"].replace("cmpl-", "chatcmpl-")
        if body.max_completion_tokens is not None:  # the newer name OpenAI gives max_tokens
            body.max_tokens = body.max_completion_tokens
        try:
            messages = [dict(role=m.role, content=message_text(m)) for m in body.messages]
            model.prompt_style.check_messages(messages)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from e
        params = make_params(body, GenParams.max_tokens, body.stop)
        encode = partial(model.encode_chat, messages, body.truncate)
        job = Job(prepare(model, params, body.truncate, encode, openai=True), params)
        if body.stream:
            include = bool((body.stream_options or {}).get("include_usage"))
            chunk_head = dict(head, object="chat.completion.chunk")
            events = openai_events(streams(engine, [job]), chunk_head, True, include)
            return sse_response(events, [job], api_error)
        r = (await answers(engine, [job], request))[0]
        message = {"role": "assistant", "content": r.text.strip()}
        return dict(head, choices=[dict(index=0, message=message, finish_reason=r.finish_reason)], usage=usage([r]))
