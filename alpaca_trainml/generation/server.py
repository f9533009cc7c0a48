"""The HTTP app: the trainML route, the OpenAI-compatible routes and the web UI (routes/ holds them by group), over
one batching engine; the uvicorn server that stops that engine first on SIGTERM."""

import errno
import logging
import signal
import socket
import threading
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from alpaca_trainml import REPO_ROOT
from alpaca_trainml.cli import UsageError
from alpaca_trainml.generation.api_schema import http_error, openapi_schema
from alpaca_trainml.generation.http_guard import (
    DEFAULT_MAX_BODY_BYTES,
    LOOPBACK_ORIGIN_REGEX,
    ApiKey,
    Guard,
    is_loopback,
)
from alpaca_trainml.generation.lora_adapters import AdapterSet, parse_module
from alpaca_trainml.generation.metrics import CountAnswers, ObservedEngine
from alpaca_trainml.generation.model import InstructModel
from alpaca_trainml.generation.protocol import install_error_handlers
from alpaca_trainml.generation.routes import instruct, lora, openai_api, status
from alpaca_trainml.generation.speculative import lookup_for

logger = logging.getLogger(__name__)
FRONT_END = REPO_ROOT / "front-end"
ROUTE_GROUPS = (status, instruct, openai_api, lora)  # each adds its routes: add_routes(app, model, engine, name)
COUNTED_ROUTES = ("/", "/health", "/metrics", "/instruct", "/v1/models", "/v1/completions", "/v1/chat/completions")
COUNTED_ROUTES += ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


def create_app(
    model,
    api_key=None,
    served_model_name=None,
    max_batch_size=8,
    allowed_origins=(),
    host="127.0.0.1",
    max_body_bytes=DEFAULT_MAX_BODY_BYTES,
    max_waiting=256,
    max_model_len=None,
    lora_modules=(),
    allow_runtime_lora_updating=False,
):
    """The FastAPI app around a loaded InstructModel; its engine (model thread) starts and stops with the app.
    max_model_len: a smaller context window to serve than the model's. lora_modules: LoRA adapters served beside the
    base, each a dict of name, path and base_model_name (lora_adapters.parse_module); allow_runtime_lora_updating
    adds the routes that load and unload more (routes/lora.py). Either sets model.adapters; the base alone: None."""
    if max_model_len is not None:
        if max_model_len < 2:
            raise ValueError(f"--max_model_len {max_model_len}: a context window needs at least 2 tokens")
        model.context_window = min(model.context_window, max_model_len)
        model.max_prompt_tokens = min(model.max_prompt_tokens, model.context_window)
    name = served_model_name or model.name
    model.adapters = AdapterSet(model.model, name) if lora_modules or allow_runtime_lora_updating else None
    for module in lora_modules:
        model.adapters.add(**module)
    engine = ObservedEngine(model, max_batch_size, max_waiting, name)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="Alpaca instruct server", lifespan=lifespan)
    app.state.engine, app.state.allow_runtime_lora_updating = engine, allow_runtime_lora_updating
    install_error_handlers(app)
    app.add_exception_handler(StarletteHTTPException, http_error)  # keeps a 405's Allow
    add_middleware(app, api_key, allowed_origins, host, max_body_bytes)
    app.add_middleware(CountAnswers, metrics=engine.metrics, handlers=COUNTED_ROUTES)  # outermost: counts refusals
    for group in ROUTE_GROUPS:
        group.add_routes(app, model, engine, name)
    app.mount("/", StaticFiles(directory=FRONT_END, html=True), name="front-end")

    def served():  # the names `model` may take: the base's and the adapters' loaded now
        return [name, *(model.adapters.names() if model.adapters is not None else [])]

    app.openapi = lambda: openapi_schema(app, model.context_window, model.vocab_size, served(), api_key)
    return app


def add_middleware(app, api_key, allowed_origins, host, max_body_bytes):
    """Auth, CORS and the guard; the last added runs first."""
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


class Server(uvicorn.Server):
    """uvicorn's server, but SIGTERM (or Ctrl+C) first ends every request at the engine's next step: streams get
    an error event, the others a 503. uvicorn alone waits for running requests, minutes for long answers."""

    def __init__(self, config, engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame):
        self.engine.shutdown()
        super().handle_exit(sig, frame)

    async def startup(self, sockets=None):
        await super().startup(sockets=sockets)
        if sockets is not None and self.started:  # uvicorn says where it listens only for a socket it bound itself
            host, port = sockets[0].getsockname()[:2]
            logger.info("serving on http://%s:%d (Ctrl+C to stop)", f"[{host}]" if ":" in host else host, port)


def build_server(args, model=None):
    """The server for parsed args; model: an InstructModel already loaded (default: load args' model)."""
    if not is_loopback(args.host) and not args.api_key:
        logger.warning("listening on %s without --api_key: anyone who can reach this port can use the model", args.host)
    if model is None:
        model = InstructModel(
            args.model_name_or_path, args.max_prompt_tokens, dtype=args.dtype, base_model=args.base_model
        )
    if getattr(args, "speculative", None) is not None:  # given: it decides, also for a model loaded already
        model.speculative = lookup_for(args.speculative)
    model.prefix_cache_mb = getattr(args, "prefix_cache_mb", model.prefix_cache_mb)  # read by the engine's batch
    app = create_app(
        model,
        args.api_key,
        args.served_model_name,
        args.max_batch_size,
        args.allowed_origins,
        args.host,
        args.max_body_bytes,
        max_model_len=getattr(args, "max_model_len", None),
        lora_modules=[parse_module(spec) for spec in getattr(args, "lora_modules", None) or []],
        allow_runtime_lora_updating=getattr(args, "allow_runtime_lora_updating", False),
    )
    # the backstop: after 5 s, requests still running are cut off
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return Server(config, app.state.engine)


def bind_socket(host, port):
    """A socket bound to host:port for uvicorn to listen on (Server.run(sockets=[...])); taken before the model
    loads, so a port in use is one line at once. uvicorn alone finds it only after the load, and exits 3."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses a port in TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        hint = "; stop what uses it or choose another --port" if e.errno == errno.EADDRINUSE else ""
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from e
    return sock


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
