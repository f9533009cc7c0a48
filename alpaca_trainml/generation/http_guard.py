"""Safe defaults for a model server on this machine (serve.py): no drive-by use from web pages, no DNS rebinding,
no unbounded request bodies.

- Host: a server bound to a loopback address answers only requests whose Host header is a loopback name
  (localhost, 127.x.x.x, [::1], any port). A page on evil.example whose name is re-pointed at 127.0.0.1 (DNS
  rebinding) sends Host: evil.example and is refused.
- Origin: a browser request from another origin is refused unless that origin is a loopback one (another local
  tool), the server's own, or listed in --allowed_origins ("*" allows every origin). The CORS headers follow the
  same rule, so allowed pages can read the answers.
- Body: over max_body_bytes, a request gets 413, whether it says its Content-Length or sends chunks.
- API key (ApiKey, with --api_key): the model routes and /metrics need 'Authorization: Bearer <key>'; / and /health
  stay open.
"""

import hmac
import ipaddress
import json
import re
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException

from alpaca_trainml.generation.protocol import ApiError

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: a 3,072-token prompt is ~12 KB; a base64 image would need more
LOOPBACK_ORIGIN_REGEX = r"https?://(localhost|127(\.\d{1,3}){3}|\[::1\])(:\d+)?"


def is_loopback(hostname):
    """True for localhost, 127.0.0.0/8 and ::1 (brackets allowed)."""
    name = (hostname or "").strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(host_header):
    """The name in a Host header, without its port: 'localhost:8000' -> 'localhost', '[::1]:80' -> '[::1]'."""
    host = (host_header or "").strip()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def origin_allowed(origin, host_header, allowed_origins):
    """Whether a browser page at `origin` may call this server (reached as `host_header`)."""
    if "*" in allowed_origins or origin in allowed_origins:
        return True
    if re.fullmatch(LOOPBACK_ORIGIN_REGEX, origin):
        return True
    return urlsplit(origin).netloc.lower() == (host_header or "").lower()  # the server's own page


class Guard:
    """ASGI middleware applying the module's three rules to every HTTP request."""

    def __init__(self, app, loopback_only=True, allowed_origins=(), max_body_bytes=DEFAULT_MAX_BODY_BYTES):
        self.app, self.loopback_only = app, loopback_only
        self.allowed_origins, self.max_body_bytes = tuple(allowed_origins), max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self.refusal(headers)
        if problem is not None:
            return await self.refuse(send, *problem)
        return await self.app(scope, self.bounded(receive), send)

    def refusal(self, headers):
        """(status, message) when the request must be refused, else None."""
        host, origin = headers.get("host", ""), headers.get("origin")
        if self.loopback_only and not is_loopback(host_name(host)):
            return 403, (
                f"Host {host!r} is not allowed: this server listens on a loopback address and answers only "
                "localhost, 127.0.0.1 or [::1] (start it with --host 0.0.0.0 to serve other names)"
            )
        if origin is not None and not origin_allowed(origin, host, self.allowed_origins):
            return 403, (
                f"requests from the web page at {origin} are not allowed: start the server with "
                f"--allowed_origins {origin} to let that page use it"
            )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return 413, self.too_large(int(length))
        return None

    def too_large(self, size):
        return f"the request body is {size} bytes or more; the limit is {self.max_body_bytes} (--max_body_bytes)"

    def bounded(self, receive):
        """receive() that counts body bytes: past the limit, a 413 (chunked bodies say no length up front)."""
        seen = 0

        async def wrapped():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise HTTPException(413, self.too_large(seen))  # serve.py answers it as a JSON error
            return message

        return wrapped

    @staticmethod
    async def refuse(send, status, message):
        kind = "invalid_request_error" if status == 413 else "permission_error"
        await send_error(send, ApiError(status, message, kind, code=status))


async def send_error(send, error):
    body = json.dumps(error.body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ApiKey:
    """ASGI middleware: /instruct, /metrics and /v1/* need 'Authorization: Bearer <api_key>' (CORS preflights carry
    none)."""

    def __init__(self, app, api_key):
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        guarded = scope["type"] == "http" and (path in ("/instruct", "/metrics") or path.startswith("/v1/"))
        if guarded and scope["method"] != "OPTIONS":
            headers = dict(scope["headers"])
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
                message = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
                return await send_error(send, ApiError(401, message, "authentication_error", code="invalid_api_key"))
        return await self.app(scope, receive, send)
