"""The HTTP app: the trainML route, the OpenAI-compatible routes and the web UI, over one batching engine."""

import logging
import signal
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from alpaca_trainml import REPO_ROOT
from alpaca_trainml.generation.decoding import GenParams, check_params, generation_limits
from alpaca_trainml.generation.engine import (
    Engine,
    EngineStopped,
    Job,
    QueueFullError,
    RequestCancelled,
    stream,
    wait_for,
)
from alpaca_trainml.generation.http_guard import (
    DEFAULT_MAX_BODY_BYTES,
    LOOPBACK_ORIGIN_REGEX,
    ApiKey,
    Guard,
    is_loopback,
)
from alpaca_trainml.generation.model import ContextLengthError, InstructModel, PromptTooLongError
from alpaca_trainml.generation.protocol import (
    ApiError,
    ChatBody,
    CompletionBody,
    InstructBody,
    chat_to_alpaca,
    install_error_handlers,
    instruct_events,
    make_params,
    openai_events,
    sse_response,
    usage,
)

logger = logging.getLogger(__name__)
FRONT_END = REPO_ROOT / "front-end"
OPENAI_MAX_TOKENS = 16  # the OpenAI completions default when max_tokens is left out
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


def prepare(model, params, truncate, encode, openai=False):
    """Check the settings and encode the prompt; any problem becomes a 400 naming the setting or the limit.

    encode(limit) gives the prompt's ids, at most `limit` of them (None: the training length). /instruct keeps the
    trainML route's limit, the training length. The OpenAI routes take, as vLLM does, any prompt that fits the
    context window with max_tokens, and log a warning past the training length."""
    try:
        check_params(params, model.context_window)
        room = model.context_window - params.max_tokens
        ids = encode((room if truncate else sys.maxsize) if openai else None)
        model.check_fits(len(ids), params.max_tokens)
    except PromptTooLongError as e:
        raise ApiError(400, str(e), code="prompt_too_long") from e
    except ContextLengthError as e:
        raise ApiError(400, str(e), param="max_tokens", code="context_length_exceeded") from e
    except ValueError as e:
        raise ApiError(400, str(e)) from e
    if len(ids) > model.max_prompt_tokens:
        logger.warning(
            "a prompt of %d tokens: longer than the %d this model was trained on, its answer may suffer",
            len(ids),
            model.max_prompt_tokens,
        )
    return ids


def api_error(e):
    """The JSON error a request answers with, for what went wrong while it waited on the engine."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, (QueueFullError, EngineStopped)):
        return ApiError(503, str(e), "server_error")
    if isinstance(e, RequestCancelled):
        return ApiError(499, str(e), "server_error")  # the client has gone: nobody reads this
    return ApiError(500, f"generation failed ({type(e).__name__}): {e}", "server_error")


async def answers(engine, jobs, request):
    try:
        return await wait_for(engine, jobs, request.is_disconnected, DISCONNECT_POLL_S)
    except RequestCancelled as e:  # normal: a client may stop waiting
        logger.info("%s %s: the client left before the answer was finished; stopped", request.method, request.url.path)
        raise api_error(e) from e
    except Exception as e:  # the model thread logged a model failure; the caller gets JSON
        raise api_error(e) from e


def streams(engine, jobs):
    """The jobs' streams, submitted now: a full queue is a 503 before the status line is sent."""
    try:
        return [stream(engine, j) for j in jobs]
    except Exception as e:
        for j in jobs:  # the queue filled halfway: take back the prompts already in
            j.cancel.set()
        raise api_error(e) from e


def create_app(
    model,
    api_key=None,
    served_model_name=None,
    max_batch_size=8,
    allowed_origins=(),
    host="127.0.0.1",
    max_body_bytes=DEFAULT_MAX_BODY_BYTES,
    max_waiting=256,
):
    """The FastAPI app around a loaded InstructModel; its engine (model thread) starts and stops with the app."""
    engine, name = Engine(model, max_batch_size, max_waiting), served_model_name or model.name

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="Alpaca instruct server", lifespan=lifespan)
    app.state.engine = engine
    install_error_handlers(app)
    if api_key:
        app.add_middleware(ApiKey, api_key=api_key)
    # CORS after auth, so outside it: a 401 also carries CORS headers, and the UI can show it
    origins = ["*"] if "*" in allowed_origins else list(allowed_origins)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_origin_regex=LOOPBACK_ORIGIN_REGEX,
        allow_methods=["*"],
        allow_headers=["*"],
    )
    # outermost: a foreign Host or Origin, or an over-long body, is refused before anything else runs
    app.add_middleware(
        Guard, loopback_only=is_loopback(host), allowed_origins=allowed_origins, max_body_bytes=max_body_bytes
    )

    def check_openai(body, unsupported):
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

    @app.get("/health")
    async def health():
        return dict(
            status="ok",
            model=name,
            max_prompt_tokens=model.max_prompt_tokens,
            context_window=model.context_window,
            queued=engine.queued(),
            running=engine.running(),
            limits=generation_limits(model.context_window),  # the web page's defaults and ranges
        )

    @app.get("/v1/models")
    async def models():
        card = dict(id=name, object="model", created=0, owned_by="alpaca", max_model_len=model.context_window)
        return {"object": "list", "data": [card]}

    @app.post("/instruct")
    async def instruct(body: InstructBody, request: Request):
        params = make_params(body, GenParams.max_tokens)
        if not body.instruction.strip():
            raise ApiError(400, "instruction is empty: say what the model should do", param="instruction")
        job = Job(
            prepare(
                model,
                params,
                body.truncate,
                lambda n: model.encode_instruction(body.instruction, body.input, body.truncate, n),
            ),
            params,
        )
        if body.stream:
            return sse_response(instruct_events(streams(engine, [job])[0]), [job], api_error)
        return (await answers(engine, [job], request))[0].text.strip()

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        head = dict(
            check_openai(body, [("echo", body.echo, False), ("logprobs", body.logprobs, None)]),
            object="text_completion",
        )
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt is an empty list", param="prompt")
        params = make_params(body, OPENAI_MAX_TOKENS, body.stop)
        encode = lambda p: lambda n: model.encode(p, body.truncate, n)  # noqa: E731
        jobs = [Job(prepare(model, params, body.truncate, encode(p), openai=True), params) for p in prompts]
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
        head = dict(check_openai(body, [("logprobs", bool(body.logprobs), False)]), object="chat.completion")
        head["id"] = head["id"].replace("cmpl-", "chatcmpl-")
        if body.max_completion_tokens is not None:  # the newer name OpenAI gives max_tokens
            body.max_tokens = body.max_completion_tokens
        try:
            instruction, context = chat_to_alpaca(body.messages)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from e
        params = make_params(body, GenParams.max_tokens, body.stop)
        encode = lambda n: model.encode_instruction(instruction, context, body.truncate, n)  # noqa: E731
        job = Job(prepare(model, params, body.truncate, encode, openai=True), params)
        if body.stream:
            include = bool((body.stream_options or {}).get("include_usage"))
            chunk_head = dict(head, object="chat.completion.chunk")
            events = openai_events(streams(engine, [job]), chunk_head, True, include)
            return sse_response(events, [job], api_error)
        r = (await answers(engine, [job], request))[0]
        message = {"role": "assistant", "content": r.text.strip()}
        return dict(head, choices=[dict(index=0, message=message, finish_reason=r.finish_reason)], usage=usage([r]))

    app.mount("/", StaticFiles(directory=FRONT_END, html=True), name="front-end")
    return app


class Server(uvicorn.Server):
    """uvicorn's server, but SIGTERM (or Ctrl+C) first ends every request at the engine's next step: streams get
    an error event, the others a 503. uvicorn alone waits for running requests, minutes for long answers."""

    def __init__(self, config, engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame):
        self.engine.shutdown()
        super().handle_exit(sig, frame)


def build_server(args, model=None):
    """The server for parsed args; model: an InstructModel already loaded (default: load args' model)."""
    if not is_loopback(args.host) and not args.api_key:
        logger.warning("listening on %s without --api_key: anyone who can reach this port can use the model", args.host)
    if model is None:
        model = InstructModel(
            args.model_name_or_path, args.max_prompt_tokens, dtype=args.dtype, base_model=args.base_model
        )
    app = create_app(
        model,
        args.api_key,
        args.served_model_name,
        args.max_batch_size,
        args.allowed_origins,
        args.host,
        args.max_body_bytes,
    )
    # the backstop: after 5 s, requests still running are cut off
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return Server(config, app.state.engine)


class ServerThread:
    """A uvicorn server on a thread of this process, for tests and benchmarks that share its loaded model:

    with ServerThread(build_server(parse_args(["--port", "8001"]))) as running:
        httpx.get(f"{running.url}/health")
    """

    def __init__(self, server, start_timeout=120):
        self.server, self.start_timeout = server, start_timeout
        self.url = f"http://{server.config.host}:{server.config.port}"
        self.thread = threading.Thread(target=server.run, daemon=True)  # uvicorn installs no signal handlers off main

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url} (port taken?)")
            time.sleep(0.05)
        return self

    def stop(self, timeout=30):
        self.server.handle_exit(signal.SIGTERM, None)  # what a SIGTERM does to `python serve.py`
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"the server on {self.url} did not stop within {timeout} s")

    def __exit__(self, *exc):
        if self.thread.is_alive():
            self.stop()
