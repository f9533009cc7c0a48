"""What serve.py speaks: the request bodies of the fork's trainML route (/instruct) and of the OpenAI API, and the
shapes of answers, errors and stream events. No model here (a chat's prompt is its prompt style's: data/prompts.py)."""

import asyncio
import json
import logging
from typing import Annotated, Any, Dict, List, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from alpaca_trainml.generation.decoding import GenParams
from alpaca_trainml.generation.limits import MAX_BEAMS, MAX_STOPS, MAX_TEMPERATURE

logger = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status, message, kind="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.body = status, {"error": dict(message=message, type=kind, param=param, code=code)}


class _Body(BaseModel):
    # OpenAI clients send fields we have no use for (user, logit_bias...); strict: `true` is not a number, "1" not 1
    model_config = ConfigDict(extra="ignore", strict=True)


# The ranges every generation path checks (decoding.check_params), stated here too so that /openapi.json tells them.
# What depends on the model (max_tokens: up to the context window; token ids: the vocabulary; model: the names
# served) is filled in per app by api_schema.openapi_schema, where these markers stand.
MAX_TOKENS_MARK, TOKEN_ID_MARK, MODEL_MARK = "x-max-tokens", "x-token-id", "x-model"


def _whole(x):
    """JSON Schema counts 1.0 as an integer; strict pydantic does not. Take it, as 1."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


Whole = BeforeValidator(_whole)


def _only_false(x):
    if x is not False:
        raise ValueError("only false is supported here; leave it out")
    return x


OnlyFalse = Annotated[bool, AfterValidator(_only_false), Field(json_schema_extra={"const": False})]  # no echo...
MaxTokens = Annotated[int, Field(ge=1, json_schema_extra={MAX_TOKENS_MARK: True}), Whole]
TokenId = Annotated[int, Field(ge=0, json_schema_extra={TOKEN_ID_MARK: True}), Whole]
Temperature = Annotated[float, Field(ge=0, le=MAX_TEMPERATURE, description="0 = greedy")]
TopP = Annotated[float, Field(gt=0, le=1)]
Beams = Annotated[int, Field(ge=1, le=MAX_BEAMS), Whole]
StopText = Annotated[str, Field(min_length=1)]
Stop = StopText | Annotated[List[StopText], Field(max_length=MAX_STOPS)]


class InstructBody(_Body):
    model_config = ConfigDict(json_schema_extra={"examples": [{"instruction": "Name a colour.", "max_tokens": 16}]})
    # not blank; \x1c-\x1f: Python's str.isspace() counts them as blanks, Unicode's White_Space does not
    instruction: Annotated[str, Field(pattern=r"[^\s\x1c-\x1f]", description="what the model should do; not blank")]
    input: str | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    num_beams: Beams | None = None
    truncate: bool = False
    stream: bool = False


class StreamOptions(_Body):
    include_usage: bool = False


class TextFormat(_Body):
    type: Literal["text"]


class JsonObjectFormat(_Body):
    type: Literal["json_object"]


class JsonSchemaSpec(_Body):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: Dict[str, Any] | None = Field(
        None,
        alias="schema",
        description="a JSON schema (structured.py: llguidance's subset; a keyword it does not implement is a 400 of "
        "code invalid_json_schema); left out, any JSON object",
    )
    strict: bool | None = None  # the answer follows the schema either way


class JsonSchemaFormat(_Body):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class _OpenAIBody(_Body):
    model: Annotated[str, Field(json_schema_extra={MODEL_MARK: True})] | None = None  # the schema lists the names
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = 1.0  # OpenAI's defaults
    top_p: TopP | None = 1.0
    n: Annotated[int, Field(ge=1, le=1), Whole] = 1  # one choice per prompt
    stop: Stop | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    num_beams: Beams | None = None  # ours, as in /instruct
    truncate: bool = False
    response_format: ResponseFormat | None = None  # JSON output (generation/structured.py)


TokenPrompt = List[TokenId]  # token ids; [] starts from the beginning-of-text token, as an empty string does


class CompletionBody(_OpenAIBody):
    model_config = ConfigDict(json_schema_extra={"examples": [{"prompt": "Once upon a time", "max_tokens": 16}]})
    prompt: (
        str
        | Annotated[List[str], Field(min_length=1)]
        | TokenPrompt
        | Annotated[List[TokenPrompt], Field(min_length=1)]
    ) = Field(description="a text, texts, token ids, or lists of token ids; empty starts from beginning-of-text")
    echo: OnlyFalse = False
    logprobs: None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | List[TextPart] | None = None


class ChatBody(_OpenAIBody):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 16}]
        }
    )
    messages: Annotated[List[ChatMessage], Field(min_length=1, description="the last one must be the user's")]
    max_completion_tokens: MaxTokens | None = None
    logprobs: OnlyFalse | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorBody(BaseModel):
    """Every error answer's body, as OpenAI's."""

    error: ErrorDetail


def message_text(message):
    if isinstance(message.content, list):
        parts = [p if isinstance(p, dict) else p.model_dump() for p in message.content]
        kinds = {p.get("type") for p in parts} - {"text"}
        if kinds:
            raise ValueError(f"content parts of type {sorted(map(str, kinds))} are not supported; send text")
        return "".join(p.get("text", "") for p in parts)
    return message.content or ""


def prompt_list(prompt):
    """A completions body's prompts, each a text or a list of token ids ([] is one empty prompt of token ids)."""
    if isinstance(prompt, str) or all(isinstance(x, int) for x in prompt):
        return [prompt]
    return list(prompt)


def include_usage(body):
    return bool(body.stream_options and body.stream_options.include_usage)


def make_params(body, max_tokens_default, stop=None):
    given = dict(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, num_beams=body.num_beams)
    given["max_tokens"] = given["max_tokens"] if given["max_tokens"] is not None else max_tokens_default
    stop = [stop] if isinstance(stop, str) else stop or []
    return GenParams(stop=tuple(stop), **{k: v for k, v in given.items() if v is not None})


def usage(results):
    """OpenAI's usage, with the prompt tokens found in the prefix cache as OpenAI reports its cached tokens."""
    p, c = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    return {
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


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
    (the engine drops them at its next step).
    Each event gives the event loop a turn: when a write fails because the client has gone, the server learns it in
    a callback on the loop. Without that turn, tokens already queued went one after another into the closed socket,
    and past five of them asyncio logged "socket.send() raised exception." at WARNING."""

    async def body():
        ended = False
        try:
            async for event in events:
                yield sse(event)
                await asyncio.sleep(0)
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
    return "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}{_got(e)}" for e in errors)


def _got(error):
    """' (got 'tool')': the value refused, when it is short (a missing field has none)."""
    value = error.get("input")
    if "input" not in error or error.get("type") == "missing" or isinstance(value, (dict, list)):
        return ""
    if len(repr(value)) > 40:
        return ""
    return f" (got {value!r})"


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
