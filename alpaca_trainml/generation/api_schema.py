"""What /openapi.json tells about serve.py, kept true: every error a route can answer with (with our error body),
the model's own limits (max_tokens up to the context window, token ids inside the vocabulary), the two content types
of a route that streams, bearer auth when --api_key is set, and the `Allow` header of a 405 (RFC 9110)."""

from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.routing import Match

from alpaca_trainml.generation.protocol import MAX_TOKENS_MARK, MODEL_MARK, TOKEN_ID_MARK, ApiError, ErrorBody

ERRORS = {
    400: "A malformed body, a setting out of range, or what a JSON schema cannot say: the prompt and max_tokens "
    "beyond the context window (code context_length_exceeded), a prompt past /instruct's training length "
    "(prompt_too_long), a chat whose last message is not the user's (invalid_messages), a token id past the "
    "vocabulary (invalid_token_id), a response_format JSON schema the grammar library refuses (invalid_json_schema) or "
    "JSON output asked of a beam search (response_format_with_beams), or JSON the model's tokenizer cannot spell "
    "(response_format_unwritable)",
    401: "--api_key is set and the request has no 'Authorization: Bearer <key>', or a wrong one",
    403: "a foreign Host header or a web page's Origin that is not allowed (generation/http_guard.py)",
    404: "`model` names a model this server does not serve",
    413: "the body is larger than --max_body_bytes",
    503: "the queue is full (retry later), or the server is shutting down",
}
ROUTE_ERRORS = {"generate": (400, 401, 403, 404, 413, 503), "read": (401, 403), "open": (403,)}
STREAM_OK = {
    "description": "the answer; with `stream: true`, server-sent events (`data: {...}` lines, then `data: [DONE]`)",
    "content": {
        "application/json": {},
        "text/event-stream": {  # each event
            "schema": {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
        },
    },
}


def error_responses(kind, streams=False):
    """FastAPI `responses=` for a route: `kind` is generate (POST routes), read (GET /v1/*) or open (/health)."""
    out = {code: {"model": ErrorBody, "description": ERRORS[code]} for code in ROUTE_ERRORS[kind]}
    return {200: STREAM_OK, **out} if streams else out


def openapi_schema(app, context_window, vocab_size, names, api_key=None):
    """The app's OpenAPI document with the model's limits and the served `names` filled in where protocol.py marks
    them (another name is a 404). FastAPI's 422
    (its own validation error body) is taken out: this server answers a bad body with a 400 and our error body, as
    OpenAI does."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            operation.get("responses", {}).pop("422", None)
            if api_key and "401" in operation.get("responses", {}):
                operation["security"] = [{"bearer": []}]
    components = schema.get("components", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    if api_key:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["components"] = components
    marks = {MAX_TOKENS_MARK: {"maximum": context_window}, TOKEN_ID_MARK: {"maximum": vocab_size - 1}}
    _fill_marks(schema, {**marks, MODEL_MARK: {"enum": list(names)}})
    app.openapi_schema = schema
    return schema


def _fill_marks(node, fills):
    """Replace each marker with the keywords it stands for, anywhere in the document."""
    if isinstance(node, dict):
        for mark, keywords in fills.items():
            if node.pop(mark, None):
                node.update(keywords)
        for value in node.values():
            _fill_marks(value, fills)
    elif isinstance(node, list):
        for value in node:
            _fill_marks(value, fills)


def route_methods(app, path):
    """The methods the app's routes answer at `path` (none for the web UI's files, mounted at /)."""
    scope, methods = {"type": "http", "path": path, "root_path": "", "method": "GET"}, set()
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    return methods


def http_error(request, e):
    """Starlette's HTTP errors (404, 405, 413...) as our error body, with their headers. A 405 says Allow (RFC 9110).
    The web UI's files, mounted at /, answer every path a route does not: there GET /instruct would be their 404,
    and POST /health their 405 saying GET and HEAD; the routes know better."""
    status, headers = e.status_code, {k: v for k, v in (e.headers or {}).items() if k.lower() != "allow"}
    if status in (404, 405):
        methods = route_methods(request.app, request.url.path)
        if methods and request.method not in methods:
            status = 405
        if status == 405:
            headers["Allow"] = ", ".join(sorted(methods or {"GET", "HEAD"}))
    detail = "Method Not Allowed" if status != e.status_code else str(e.detail)
    body = ApiError(status, detail, code=status).body
    return JSONResponse(body, status_code=status, headers=headers)
