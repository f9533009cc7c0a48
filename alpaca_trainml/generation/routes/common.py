"""The steps every generating route shares: check and encode a request, wait for or stream its answer from the
engine, and map what went wrong to the JSON error the client gets."""

import logging
import sys

from alpaca_trainml.generation.decoding import check_params
from alpaca_trainml.generation.engine import EngineStopped, QueueFullError, RequestCancelled, stream, wait_for
from alpaca_trainml.generation.model import ContextLengthError, PromptTooLongError, TokenIdError
from alpaca_trainml.generation.protocol import ApiError
from alpaca_trainml.generation.structured import GrammarError, UnwritableError, format_schema

logger = logging.getLogger(__name__)
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
    except TokenIdError as e:
        raise ApiError(400, str(e), param="prompt", code="invalid_token_id") from e
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
    if isinstance(e, UnwritableError):
        return ApiError(400, str(e), param="response_format", code="response_format_unwritable")
    if isinstance(e, RequestCancelled):
        return ApiError(499, str(e), "server_error")  # the client has gone: nobody reads this
    return ApiError(500, f"generation failed ({type(e).__name__}): {e}", "server_error")


async def answers(engine, jobs, request):
    """The jobs' Completions; a client that leaves first is one INFO line (normal), then a 499 nobody reads."""
    try:
        return await wait_for(engine, jobs, request.is_disconnected, DISCONNECT_POLL_S)
    except RequestCancelled as e:
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


def grammar_factory(grammars, response_format, params):
    """For a body's response_format: a factory of one grammar matcher per answer, or None for free text. A schema the
    grammar library refuses, or JSON output asked of a beam search (which runs apart, unconstrained), is a 400."""
    schema = format_schema(response_format)
    if schema is None:
        return None
    if params.num_beams > 1:
        message = "response_format needs num_beams 1: beam search does not follow a grammar here"
        raise ApiError(400, message, param="response_format", code="response_format_with_beams")
    try:
        return grammars.compile(schema)
    except GrammarError as e:
        raise ApiError(400, str(e), param="response_format", code="invalid_json_schema") from e
