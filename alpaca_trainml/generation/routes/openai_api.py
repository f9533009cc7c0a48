"""The OpenAI-compatible routes: GET /v1/models, POST /v1/completions and /v1/chat/completions (`stream: true`
answers with server-sent events). A chat is prompted through the checkpoint's own chat template (its prompt style,
InstructModel.encode_chat), as vLLM and llama.cpp prompt it."""

import time
import uuid
from functools import partial

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from alpaca_trainml.generation.api_schema import error_responses
from alpaca_trainml.generation.decoding import GenParams
from alpaca_trainml.generation.engine import Job
from alpaca_trainml.generation.model import PromptTooLongError
from alpaca_trainml.generation.protocol import (
    ApiError,
    ChatBody,
    CompletionBody,
    include_usage,
    make_params,
    message_text,
    openai_events,
    prompt_list,
    sse_response,
    usage,
)
from alpaca_trainml.generation.routes.common import answers, api_error, grammar_factory, prepare, streams
from alpaca_trainml.generation.structured import Grammars

OPENAI_MAX_TOKENS = 16  # the OpenAI completions default when max_tokens is left out


def response_head(body, name, adapters=None):
    """(id, created and model of an answer, the LoRA adapter it asks for or None); a 404 for a model not served.
    (Settings we do not support, such as n > 1, echo or logprobs, are refused by the request models: a 400 naming
    them.)"""
    adapter = adapters.get(body.model) if adapters is not None and body.model else None
    if body.model and body.model != name and adapter is None:
        served = [name, *(adapters.names() if adapters is not None else [])]
        raise ApiError(
            404,
            f"The model {body.model!r} does not exist; this server serves {', '.join(map(repr, served))} "
            "(see GET /v1/models)",
            param="model",
            code="model_not_found",
        )
    head = dict(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=adapter.name if adapter else name)
    return head, adapter


def model_cards(model, name, adapters):
    """GET /v1/models' entries: the base, then each LoRA adapter with its `parent` and `root` (its folder), as vLLM
    lists them."""
    card = dict(object="model", created=0, owned_by="alpaca", max_model_len=model.context_window)
    cards = [dict(card, id=name, root=model.name, parent=None)]
    for adapter in adapters.by_name.values() if adapters is not None else []:
        cards.append(dict(card, id=adapter.name, root=adapter.path, parent=adapter.parent))
    return cards


def encode_chat(model, messages, truncate, limit):
    """model.encode_chat, with a chat the template cannot take (its last message not the user's...) as a 400 of code
    invalid_messages: a rule the OpenAPI schema cannot state (api_schema.ERRORS)."""
    try:
        return model.encode_chat(messages, truncate, limit)
    except PromptTooLongError:
        raise
    except ValueError as e:
        raise ApiError(400, str(e), param="messages", code="invalid_messages") from e


def add_routes(app, model, engine, name):
    grammars = Grammars(model.tokenizer, model.eos_ids, model.tokenizer_lock)

    async def grammar(body, params):
        """The body's response_format as a matcher factory (None: free text); compiled off the event loop."""
        return await run_in_threadpool(grammar_factory, grammars, body.response_format, params)

    @app.get("/v1/models", responses=error_responses("read"))
    async def models():
        return {"object": "list", "data": model_cards(model, name, model.adapters)}

    @app.post("/v1/completions", responses=error_responses("generate", streams=True))
    async def completions(body: CompletionBody, request: Request):
        head, adapter = response_head(body, name, model.adapters)
        head["object"] = "text_completion"
        prompts = prompt_list(body.prompt)
        params = make_params(body, OPENAI_MAX_TOKENS, body.stop)
        encodes = [partial(model.encode, p, body.truncate) for p in prompts]  # each: limit -> the prompt's ids
        ids = [prepare(model, params, body.truncate, encode, openai=True) for encode in encodes]
        matcher = await grammar(body, params)
        jobs = [Job(i, params, grammar=matcher() if matcher else None, adapter=adapter) for i in ids]
        if body.stream:
            events = openai_events(streams(engine, jobs), head, False, include_usage(body))
            return sse_response(events, jobs, api_error)
        results = await answers(engine, jobs, request)
        choices = [
            dict(text=r.text, index=i, logprobs=None, finish_reason=r.finish_reason) for i, r in enumerate(results)
        ]
        return dict(head, choices=choices, usage=usage(results))

    @app.post("/v1/chat/completions", responses=error_responses("generate", streams=True))
    async def chat(body: ChatBody, request: Request):
        head, adapter = response_head(body, name, model.adapters)
        head["object"] = "chat.completion"
        head["id"] = head["id"].replace("cmpl-", "chatcmpl-")
        if body.max_completion_tokens is not None:  # the newer name OpenAI gives max_tokens
            body.max_tokens = body.max_completion_tokens
        try:
            messages = [dict(role=m.role, content=message_text(m)) for m in body.messages]
            model.prompt_style.check_messages(messages)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages", code="invalid_messages") from e
        params = make_params(body, GenParams.max_tokens, body.stop)
        encode = partial(encode_chat, model, messages, body.truncate)
        ids = prepare(model, params, body.truncate, encode, openai=True)
        matcher = await grammar(body, params)
        job = Job(ids, params, grammar=matcher() if matcher else None, adapter=adapter)
        if body.stream:
            chunk_head = dict(head, object="chat.completion.chunk")
            events = openai_events(streams(engine, [job]), chunk_head, True, include_usage(body))
            return sse_response(events, [job], api_error)
        r = (await answers(engine, [job], request))[0]
        message = {"role": "assistant", "content": r.text.strip()}
        return dict(head, choices=[dict(index=0, message=message, finish_reason=r.finish_reason)], usage=usage([r]))
