"""Requests to any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama, `transformers serve`, this repo's
serve.py) through the openai>=1 client, with the retry rules generate_instruction.py and evaluate.py share:

- 429, 5xx, timeouts and dropped connections: retried a bounded number of times, with exponential backoff and jitter;
- 401/403 (bad key), 404 (unknown model) and other 4xx: fail at once, with the server's own reason;
- a context-length 400: max_tokens shrinks by 20% and the request is sent again, as the original did.
"""

import logging
import os
import random
import re
import threading
import time

from alpaca_trainml.cli import UsageError

logger = logging.getLogger(__name__)
API_CHOICES = ("completions", "chat")

# Which route a model takes. GPT-2/GPT-3 tokenizer (r50k/p50k) models, where token 50256 is <|endoftext|>;
# davinci-002/babbage-002 use cl100k.
GPT2_TOKENIZER_MODELS = re.compile(
    r"(text-(davinci|curie|babbage|ada)-\d{3}|code-(davinci|cushman)-\d{3}|davinci|curie|babbage|ada"
    r"|(distil)?gpt-?2(-(medium|large|xl))?)"
)
COMPLETIONS_ONLY_MODELS = re.compile(r"gpt-3\.5-turbo-instruct(-\d+)?|davinci-002|babbage-002")


def model_family(model_name):
    return model_name.lower().rsplit("/", 1)[-1]  # "openai-community/gpt2" -> "gpt2"


def uses_gpt2_tokenizer(model_name):
    return bool(GPT2_TOKENIZER_MODELS.fullmatch(model_family(model_name)))


def choose_api(api, model_name):
    """--api auto: completions for completion-only models (GPT-2/GPT-3 family, gpt-3.5-turbo-instruct, davinci-002,
    babbage-002), chat for everything else (every current OpenAI model and what vLLM, llama.cpp, Ollama and serve.py
    serve). A chat endpoint that turns out to be missing (404 not naming a model) switches to completions once."""
    if api not in ("auto", *API_CHOICES):
        raise UsageError(f"--api {api!r}: expected auto, completions or chat")
    if api != "auto":
        return api
    family = model_family(model_name)
    return "completions" if uses_gpt2_tokenizer(model_name) or COMPLETIONS_ONLY_MODELS.fullmatch(family) else "chat"


class FatalRequestError(RuntimeError):
    """An error that retrying cannot fix (bad key, no access, unknown model, bad request) or retries ran out."""


def is_context_length_error(err):
    text = f"{getattr(err, 'code', '')} {err}".lower()
    return any(k in text for k in ("context_length", "context length", "reduce your prompt", "maximum context"))


def server_message(err):
    """The server's own reason for an error response.

    The openai client puts only an OpenAI-shaped {"error": {"message"}} in str(err); other servers answer
    {"detail": ...}, {"error": "..."} or plain text, which it would drop ("Error code: 400")."""
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        for key in ("message", "detail", "error"):
            if isinstance(body.get(key), str) and body[key]:
                return body[key]
        return str(body)[:500]
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    response = getattr(err, "response", None)
    text = getattr(response, "text", "") if response is not None else ""
    return text.strip()[:500] or str(err)


CHECK_TIMEOUT_S = 5.0  # the first look at the server; a request's own --request_timeout may be minutes


def make_client(base_url, api_key, request_timeout, check=True):
    """(openai.OpenAI client, base_url). base_url/api_key fall back to $OPENAI_BASE_URL/$OPENAI_API_KEY.
    check: ask the server for its models first (check_server), so a wrong URL or key fails in seconds."""
    import openai

    base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
    api_key = api_key or os.environ.get("OPENAI_API_KEY")
    if not api_key:
        if not base_url:
            raise UsageError("no API key: set OPENAI_API_KEY or pass --api_key (or --base_url for a local server)")
        api_key = "no-key"  # local servers (vLLM, llama.cpp, serve.py) ignore it, but the client needs one
    # max_retries=0: our Requester does the retrying, with a bound, backoff and fail-fast rules of its own
    client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=request_timeout, max_retries=0)
    if check:
        check_server(client)
    return client, base_url


def connection_reason(err):
    """'Connection refused', 'Name or service not known'...: the OS's reason under an APIConnectionError."""
    cause = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return str(err.__cause__ or err)


def check_server(client, timeout=CHECK_TIMEOUT_S):
    """GET <base_url>/models once, with a short timeout and no retry: a server that is down, a wrong URL or a
    rejected key is one UsageError naming the URL, in seconds (the retries of a run take minutes to give up)."""
    import openai

    url = str(client.base_url).rstrip("/")
    try:
        client.with_options(timeout=timeout, max_retries=0).models.list()
    except openai.APITimeoutError as e:
        raise UsageError(f"{url}: no answer within {timeout:g} s; is the server up, and is --base_url right?") from e
    except openai.APIConnectionError as e:
        raise UsageError(f"cannot reach {url}: {connection_reason(e)}; start the server or fix --base_url") from e
    except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
        raise UsageError(
            f"{url}: {e.status_code}, the server rejected the API key ({server_message(e)}); "
            "set OPENAI_API_KEY or pass --api_key"
        ) from e
    except openai.NotFoundError as e:
        raise UsageError(
            f"{url}/models: 404, not an OpenAI-compatible API; --base_url usually ends in /v1 "
            f"(e.g. http://127.0.0.1:8000/v1)"
        ) from e
    except openai.APIStatusError as e:
        raise UsageError(f"{url}/models: {e.status_code} from the server: {server_message(e)}") from e


class Requester:
    """Sends one request (a list of prompts) with bounded retries; returns ([{text, finish_reason}], usage).

    api: "completions" (every prompt in one request; a single prompt goes as a string, which every server takes) or
    "chat" (one prompt, sent as one user message). auto: a chat route that turns out to be missing (a 404 that does
    not name the model) switches to completions once. decoding: temperature, top_p, stop, n... as the API names them.
    logit_bias goes to completions only (it names token ids of one vocabulary)."""

    def __init__(
        self,
        client,
        api,
        model_name,
        max_tokens,
        auto=False,
        max_retries=6,
        retry_base_s=1.0,
        min_max_tokens=64,
        logit_bias=None,
        model_flag="--model_name",
        **decoding,
    ):
        if api not in API_CHOICES:
            raise UsageError(f"api {api!r}: expected one of {', '.join(API_CHOICES)}")
        self.client, self.api, self.model_name, self.auto = client, api, model_name, auto
        self.model_flag, self.url = model_flag, str(client.base_url).rstrip("/")  # named in the errors
        self.decoding, self.logit_bias = decoding, logit_bias
        self.max_tokens = max_tokens  # shared by the threads; shrinks for everyone after a context-length error
        self.max_retries, self.retry_base_s, self.min_max_tokens = max_retries, retry_base_s, min_max_tokens
        self.stop_event = threading.Event()  # set once the run is failing, so the other threads stop retrying
        self.retries = 0

    def chat_text(self, text):
        """Hook: the text of a chat answer as the caller wants it (subclasses strip what chat models add)."""
        return text

    def _send(self, prompts, decoding):
        kw = dict(model=self.model_name, max_tokens=self.max_tokens, **decoding)
        if self.api == "completions":
            if self.logit_bias:
                kw["logit_bias"] = self.logit_bias
            # one prompt as a string: `transformers serve` refuses a list ("prompt must be a string.")
            resp = self.client.completions.create(prompt=prompts[0] if len(prompts) == 1 else prompts, **kw)
            choices = sorted(resp.choices, key=lambda c: c.index)
            results = [{"text": c.text or "", "finish_reason": c.finish_reason} for c in choices]
        else:
            (prompt,) = prompts
            resp = self.client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)
            choice = resp.choices[0]
            results = [{"text": self.chat_text(choice.message.content or ""), "finish_reason": choice.finish_reason}]
        return results, resp.usage

    def __call__(self, prompts, **overrides):
        """Send prompts; overrides replace decoding settings for this request only (e.g. temperature=1.0)."""
        import openai

        decoding, attempt = {**self.decoding, **overrides}, 0
        while True:
            try:
                return self._send(prompts, decoding)
            except openai.BadRequestError as e:
                if not is_context_length_error(e):
                    raise FatalRequestError(f"{self.url} refused the request (400): {server_message(e)}") from e
                self.max_tokens = int(self.max_tokens * 0.8)  # as the original: 20% fewer tokens, then try again
                logger.warning("context length exceeded; max_tokens now %d", self.max_tokens)
                if self.max_tokens < self.min_max_tokens:
                    raise FatalRequestError(f"the prompt alone fills the context window: {server_message(e)}") from e
            except openai.NotFoundError as e:
                if self.auto and self.api == "chat" and "model" not in str(e).lower():
                    logger.warning("no chat endpoint here (%s); --api auto switches to completions", server_message(e))
                    self.api, self.auto = "completions", False
                    continue
                raise FatalRequestError(
                    f"404 for model {self.model_name!r} at {self.url}: {server_message(e)}. "
                    f"Check {self.model_flag} and --base_url."
                ) from e
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                raise FatalRequestError(
                    f"{e.status_code}: {self.url} rejected the API key ({server_message(e)}). "
                    "Set OPENAI_API_KEY or pass --api_key."
                ) from e
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as e:
                attempt += 1  # APIConnectionError covers APITimeoutError
                self.retries += 1
                if attempt > self.max_retries or self.stop_event.is_set():
                    raise FatalRequestError(
                        f"gave up after {attempt} attempts at {self.url}: {type(e).__name__}: {e}"
                    ) from e
                self._backoff(e, attempt)
            except openai.APIStatusError as e:  # any other 4xx
                raise FatalRequestError(f"{e.status_code} from {self.url}: {server_message(e)}") from e

    def _backoff(self, err, attempt):
        delay = self.retry_base_s * 2 ** (attempt - 1) * (0.5 + random.random())  # exponential, with jitter
        logger.warning(
            "%s: %s (%s); retry %d/%d in %.2f s",
            self.url,
            type(err).__name__,
            getattr(err, "status_code", "no status"),
            attempt,
            self.max_retries,
            delay,
        )
        time.sleep(delay)
