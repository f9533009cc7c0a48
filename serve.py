"""Serve a checkpoint over HTTP: the fork's trainML route, an OpenAI-compatible API and the web UI.

    python serve.py                                     # the embedded model, UI at http://127.0.0.1:8000
    python serve.py --model_name_or_path out/demo --port 8000 --api_key secret
    curl -s 127.0.0.1:8000/instruct -H 'Content-Type: application/json' -d '{"instruction": "Name a colour."}'
    python -m generate_instruction generate_instruction_following_data --base_url http://127.0.0.1:8000/v1 \
        --model_name embedded:smollm2-135m --api chat --output_dir out/gen

Routes: POST /instruct (body: instruction, input, max_tokens, temperature, top_p, num_beams, and our truncate
and stream; answers a JSON string, as the trainML route does), POST /v1/completions and /v1/chat/completions
(OpenAI; `stream: true` answers with server-sent events), GET /v1/models, GET /health, GET / (front-end/).

Chat on an Alpaca model: the last message must be the user's and becomes the Instruction. Everything before it
becomes the Input: system and developer messages first, as written, then the earlier turns as "User: ..." and
"Assistant: ..." lines. A chat of one user message uses the no-input template.

One thread runs the model. Requests wait in a queue; non-streaming requests waiting together with the same
temperature, top_p, num_beams and stop run as one batch (up to --max_batch_size).
"""

import argparse
import asyncio
import hmac
import logging
import queue
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference import ContextLengthError, GenParams, InstructModel, PromptTooLongError, check_params
from protocol import (
    ApiError,
    ChatBody,
    CompletionBody,
    InstructBody,
    chat_to_alpaca,
    instruct_events,
    make_params,
    openai_events,
    sse,
    usage,
    validation_message,
)
from utils import EMBEDDED_MODEL

logger = logging.getLogger(__name__)
FRONT_END = Path(__file__).resolve().parent / "front-end"
OPENAI_MAX_TOKENS = 16  # the OpenAI completions default when max_tokens is left out


@dataclass(eq=False)
class Job:
    ids: list  # prompt token ids
    params: GenParams
    on_text: Callable | None = None  # set for streaming jobs: called from the model thread with each delta
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)


def take_batch(waiting, max_size):
    """Pop the first waiting job and the later ones that can share its generate() call (same key, no stream)."""
    first = waiting.popleft()
    if first.on_text is not None:
        return [first]
    batch, rest = [first], deque()
    while waiting:
        job = waiting.popleft()
        fits = len(batch) < max_size and job.on_text is None and job.params.batch_key() == first.params.batch_key()
        (batch if fits else rest).append(job)
    waiting.extend(rest)
    return batch


class Batcher:
    """The one thread that calls the model; everything else hands it Jobs and waits on their futures."""

    def __init__(self, engine, max_batch_size=8, max_waiting=256):
        self.engine, self.max_batch_size, self.max_waiting = engine, max_batch_size, max_waiting
        self.inbox, self.waiting, self.thread = queue.Queue(), deque(), None

    def queued(self):
        return self.inbox.qsize() + len(self.waiting)

    def submit(self, job):
        if self.queued() >= self.max_waiting:
            raise ApiError(503, f"{self.queued()} requests are already waiting; retry later", "server_error")
        self.inbox.put(job)
        return job.future

    def _loop(self):
        while True:
            try:  # wait only when nothing is waiting; then take everything else that has arrived
                item = self.inbox.get(block=not self.waiting)
                while True:
                    if item is None:  # stop() was called
                        for job in self.waiting:
                            job.future.cancel()
                        return
                    self.waiting.append(item)
                    item = self.inbox.get_nowait()
            except queue.Empty:
                pass
            if self.waiting:
                self._run(take_batch(self.waiting, self.max_batch_size))

    def _run(self, batch):
        batch = [j for j in batch if j.future.set_running_or_notify_cancel()]  # drops jobs whose caller left
        if not batch:
            return
        first = batch[0]
        try:
            results = self.engine.generate(
                [j.ids for j in batch],
                first.params,
                on_text=first.on_text,
                cancel=first.cancel if len(batch) == 1 else None,
                row_max_tokens=[j.params.max_tokens for j in batch],
            )
        except Exception as e:  # noqa: BLE001 - handed to every waiting caller, who answers 500
            logger.exception("generation failed")
            for j in batch:
                j.future.set_exception(e)
            return
        for j, r in zip(batch, results):
            j.future.set_result(r)

    def start(self):
        self.inbox, self.waiting = queue.Queue(), deque()
        self.thread = threading.Thread(target=self._loop, name="model", daemon=True)
        self.thread.start()

    def stop(self, timeout=30):
        if self.thread is not None:
            self.inbox.put(None)
            self.thread.join(timeout)


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


def install_auth(app, api_key):
    """With an API key, the model routes need 'Authorization: Bearer <key>'; / and /health stay open."""
    if not api_key:
        return

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        guarded = request.url.path == "/instruct" or request.url.path.startswith("/v1/")
        if guarded and request.method != "OPTIONS":  # CORS preflights carry no credentials
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return JSONResponse(
                    ApiError(
                        401,
                        "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                        "authentication_error",
                        code="invalid_api_key",
                    ).body,
                    401,
                )
        return await call_next(request)


def prepare(engine, params, encode):
    """Check the settings and encode the prompt; any problem becomes a 400 naming the setting or the limit."""
    try:
        check_params(params, engine.context_window)
        ids = encode()
        engine.check_fits(len(ids), params.max_tokens)
        return ids
    except PromptTooLongError as e:
        raise ApiError(400, str(e), code="prompt_too_long") from e
    except ContextLengthError as e:
        raise ApiError(400, str(e), param="max_tokens", code="context_length_exceeded") from e
    except ValueError as e:
        raise ApiError(400, str(e)) from e


async def run_job(batcher, job):
    future = batcher.submit(job)
    try:
        return await asyncio.wrap_future(future)
    except Exception as e:  # noqa: BLE001 - the model thread logged it; the caller gets a JSON 500
        raise ApiError(500, f"generation failed ({type(e).__name__}): {e}", "server_error") from e


async def stream_job(batcher, job):
    """Yield text deltas from the model thread as they come; then the Completion."""
    loop, deltas = asyncio.get_running_loop(), asyncio.Queue()
    job.on_text = lambda text: loop.call_soon_threadsafe(deltas.put_nowait, text)
    future = batcher.submit(job)
    future.add_done_callback(lambda f: loop.call_soon_threadsafe(deltas.put_nowait, None))
    try:
        while (text := await deltas.get()) is not None:
            yield text
        yield future.result()
    finally:
        job.cancel.set()  # the client left (or we are done): stop generating
        future.cancel()


def sse_response(events):
    async def body():
        try:
            async for event in events:
                yield sse(event)
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream, as OpenAI does
            logger.exception("streaming failed")
            yield sse(ApiError(500, f"generation failed: {e}", "server_error").body)
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def create_app(engine, api_key=None, served_model_name=None, max_batch_size=8, allowed_origins=("*",)):
    """The FastAPI app around a loaded InstructModel; its model thread starts and stops with the app."""
    batcher, name = Batcher(engine, max_batch_size), served_model_name or engine.name

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="Alpaca instruct server", lifespan=lifespan)
    app.state.batcher = batcher
    install_error_handlers(app)
    install_auth(app, api_key)
    # added last, so outermost: a 401 also carries CORS headers, and the UI can show it
    app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"], allow_headers=["*"])

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
            max_prompt_tokens=engine.max_prompt_tokens,
            context_window=engine.context_window,
            queued=batcher.queued(),
        )

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [dict(id=name, object="model", created=0, owned_by="alpaca")]}

    @app.post("/instruct")
    async def instruct(body: InstructBody):
        params = make_params(body, GenParams.max_tokens)
        if not body.instruction.strip():
            raise ApiError(400, "instruction is empty: say what the model should do", param="instruction")
        ids = prepare(engine, params, lambda: engine.encode_instruction(body.instruction, body.input, body.truncate))
        if body.stream:
            return sse_response(instruct_events(stream_job(batcher, Job(ids, params))))
        return (await run_job(batcher, Job(ids, params))).text.strip()

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        head = dict(
            check_openai(body, [("echo", body.echo, False), ("logprobs", body.logprobs, None)]),
            object="text_completion",
        )
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt is an empty list", param="prompt")
        params = make_params(body, OPENAI_MAX_TOKENS, body.stop)
        jobs = [Job(prepare(engine, params, lambda p=p: engine.encode(p, body.truncate)), params) for p in prompts]
        if body.stream:
            include = bool((body.stream_options or {}).get("include_usage"))
            return sse_response(openai_events([stream_job(batcher, j) for j in jobs], head, False, include))
        results = await asyncio.gather(*(run_job(batcher, j) for j in jobs))
        choices = [
            dict(text=r.text, index=i, logprobs=None, finish_reason=r.finish_reason) for i, r in enumerate(results)
        ]
        return dict(head, choices=choices, usage=usage(results))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        head = dict(check_openai(body, [("logprobs", bool(body.logprobs), False)]), object="chat.completion")
        head["id"] = head["id"].replace("cmpl-", "chatcmpl-")
        if body.max_completion_tokens is not None:  # the newer name OpenAI gives max_tokens
            body.max_tokens = body.max_completion_tokens
        try:
            instruction, context = chat_to_alpaca(body.messages)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from e
        params = make_params(body, GenParams.max_tokens, body.stop)
        job = Job(
            prepare(engine, params, lambda: engine.encode_instruction(instruction, context, body.truncate)), params
        )
        if body.stream:
            include = bool((body.stream_options or {}).get("include_usage"))
            chunk_head = dict(head, object="chat.completion.chunk")
            return sse_response(openai_events([stream_job(batcher, job)], chunk_head, True, include))
        r = await run_job(batcher, job)
        message = {"role": "assistant", "content": r.text.strip()}
        return dict(head, choices=[dict(index=0, message=message, finish_reason=r.finish_reason)], usage=usage([r]))

    app.mount("/", StaticFiles(directory=FRONT_END, html=True), name="front-end")
    return app


def build_server(args, engine=None):
    """The uvicorn server for parsed args; engine: an InstructModel already loaded (default: load args' model)."""
    import uvicorn

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logger.warning("listening on %s without --api_key: anyone who can reach this port can use the model", args.host)
    if engine is None:
        engine = InstructModel(args.model_name_or_path, args.max_prompt_tokens, base_model=args.base_model)
    app = create_app(engine, args.api_key, args.served_model_name, args.max_batch_size, args.allowed_origins)
    return uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))


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
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"the server on {self.url} did not stop within {timeout} s")

    def __exit__(self, *exc):
        if self.thread.is_alive():
            self.stop()


def main(args):
    build_server(args).run()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model_name_or_path", default=None, help=f"default: $TRAINML_CHECKPOINT_PATH, else {EMBEDDED_MODEL}"
    )
    p.add_argument("--base_model", default=None, help="the base of a LoRA adapter folder (default: its own record)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface (use --api_key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", default=None, help="require 'Authorization: Bearer KEY' on /instruct and /v1/*")
    p.add_argument(
        "--served_model_name",
        default=None,
        help="the model name the OpenAI routes answer to (default: --model_name_or_path as given)",
    )
    p.add_argument(
        "--max_prompt_tokens", type=int, default=None, help="default: the tokenizer's model_max_length, else 512"
    )
    p.add_argument("--max_batch_size", type=int, default=8, help="waiting requests that run as one batch, at most")
    p.add_argument("--allowed_origins", nargs="*", default=["*"], help="CORS origins allowed to call the API")
    p.add_argument("--log_level", default="info")
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(parse_args())
