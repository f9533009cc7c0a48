"""What serve.py speaks: the request bodies of the fork's trainML route (/instruct) and of the OpenAI API, and the
shapes of answers, errors and stream events. No model here (a chat's prompt is its prompt style's: data/prompts.py)."""

import json
import logging
from typing import List

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from alpaca_trainml.generation.decoding import GenParams

logger = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status, message, kind="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.body = status, {"error": dict(message=message, type=kind, param=param, code=code)}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we have no use for (user, logit_bias...)


class InstructBody(_Body):
    instruction: str
    input: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    num_beams: int | None = None
    truncate: bool = False
    stream: bool = False


class _OpenAIBody(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = 1.0  # OpenAI's defaults
    top_p: float | None = 1.0
    n: int = 1
    stop: str | List[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    num_beams: int | None = None  # ours, as in /instruct
    truncate: bool = False


class CompletionBody(_OpenAIBody):
    prompt: str | List[str]
    echo: bool = False
    logprobs: int | None = None


class ChatMessage(_Body):
    role: str
    content: str | List[dict] | None = None


class ChatBody(_OpenAIBody):
    messages: List[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None


def message_text(message):
    if isinstance(message.content, list):
        kinds = {p.get("type") for p in message.content} - {"text"}
        if kinds:
            raise ValueError(f"content parts of type {sorted(map(str, kinds))} are not supported; send text")
        return "".join(p.get("text", "") for p in message.content)
    return message.content or ""


def make_params(body, max_tokens_default, stop=None):
    given = dict(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, num_beams=body.num_beams)
    given["max_tokens"] = given["max_tokens"] if given["max_tokens"] is not None else max_tokens_default
    stop = [stop] if isinstance(stop, str) else stop or []
    return GenParams(stop=tuple(stop), **{k: v for k, v in given.items() if v is not None})


def usage(results):
    p, c = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def install_error_handlers(app):
    def answer(status, message, kind="invalid_request_error", code=None):
        return JSONResponse(ApiError(status, message, kind, code=code).body, status_code=status)

    app.add_exception_handler(ApiError, lambda request, e: JSONResponse(e.body, status_code=e.status))
    app.add_exception_handler(RequestValidationError, lambda request, e: answer(400, validation_message(e.errors())))
    app.add_exception_handler(
        StarletteHTTPException, lambda request, e: answer(e.status_code, str(e.detail), code=e.status_code)
    )
    app.add_exception_handler(
        Exception, lambda request, e: answer(500, f"internal error ({type(e).__name__}): {e}", "server_error")
    )


def sse_response(events, jobs, to_error):
    """A server-sent events answer. An error after the status line is sent becomes an error event, as OpenAI sends
    (to_error(exception) gives its ApiError). When it ends, or its client leaves, the request's jobs are cancelled
    (the engine drops them at its next step)."""

    async def body():
        ended = False
        try:
            async for event in events:
                yield sse(event)
            ended = True
        except Exception as e:
            ended = True
            error = to_error(e)
            if error.status >= 500:
                logger.error("streaming failed: %s", error.body["error"]["message"])
            yield sse(error.body)
        finally:
            if not ended:  # normal: a client may stop reading
                logger.info("the client left a stream before the answer was finished; stopped")
            for job in jobs:
                job.cancel.set()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def validation_message(errors):
    """One line for FastAPI's validation errors: malformed JSON, or each bad field with what is wrong."""
    for e in errors:
        if e.get("type") == "json_invalid":
            return f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}"
    return "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors)


async def instruct_events(items):
    """/instruct's stream: {"text": delta} events, then one with finish_reason and usage.

    items: text deltas, then the Completion (engine.stream)."""
    first = True
    async for item in items:
        if isinstance(item, str):
            text = item.lstrip() if first else item  # instruct() strips the answer; do the same to the stream
            first = first and not text
            if text:
                yield {"text": text}
        else:
            yield {"text": "", "finish_reason": item.finish_reason, "usage": usage([item])}


async def openai_events(streams, head, chat, include_usage):
    """OpenAI stream chunks for each prompt in turn: text deltas, then one chunk with the finish_reason.

    streams: one async iterator per prompt, as instruct_events takes; each starts its job when first read."""
    results = []
    for index, items in enumerate(streams):
        if chat:
            yield dict(
                head, choices=[{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
            )
        first = True
        async for item in items:
            if not isinstance(item, str):
                results.append(item)
                done = {"delta": {}} if chat else {"text": "", "logprobs": None}
                yield dict(head, choices=[dict(done, index=index, finish_reason=item.finish_reason)])
                continue
            text = item.lstrip() if chat and first else item  # chat answers come stripped
            first = first and not text
            if text:
                part = {"delta": {"content": text}} if chat else {"text": text, "logprobs": None}
                yield dict(head, choices=[dict(part, index=index, finish_reason=None)])
    if include_usage:
        yield dict(head, choices=[], usage=usage(results))
