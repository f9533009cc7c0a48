"""POST /instruct: the trainML fork's route. The body is instruct()'s arguments (plus our truncate and stream); the
answer is a JSON string, as the trainML route answers."""

from fastapi import Request

from alpaca_trainml.generation.api_schema import error_responses
from alpaca_trainml.generation.decoding import GenParams
from alpaca_trainml.generation.engine import Job
from alpaca_trainml.generation.protocol import InstructBody, instruct_events, make_params, sse_response
from alpaca_trainml.generation.routes.common import answers, api_error, prepare, streams


def add_routes(app, model, engine, name):
    @app.post("/instruct", responses=error_responses("generate", streams=True))
    async def instruct(body: InstructBody, request: Request):
        params = make_params(body, GenParams.max_tokens)
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
