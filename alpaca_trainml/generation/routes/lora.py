"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter, vLLM's bodies and answers: add or take away a LoRA adapter
while the server runs. Off unless serve.py --allow_runtime_lora_updating (vLLM: VLLM_ALLOW_RUNTIME_LORA_UPDATING),
because a load reads a folder on the server, named by the client."""

import logging
from typing import Annotated

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError

from alpaca_trainml.cli import UsageError
from alpaca_trainml.generation import api_schema
from alpaca_trainml.generation.protocol import ApiError

logger = logging.getLogger(__name__)
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"[^\s]")]


class LoadLoraBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # as protocol._Body
    lora_name: Name
    lora_path: Annotated[str, Field(min_length=1, description="an adapter folder on the server")]


class UnloadLoraBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: Name


ERRORS = {
    400: "a bad body; a folder that is not a LoRA adapter or does not fit the base (code invalid_lora_adapter); a "
    "name taken by the base or another adapter (code lora_adapter_exists)",
    404: "no adapter of that name is loaded (unload only)",
    **{code: api_schema.ERRORS[code] for code in (401, 403, 413)},
}
OK = {200: {"description": "done", "content": {"text/plain": {"schema": {"type": "string"}}}}}


ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}  # not the 200's text


def responses(*codes):
    return {**OK, **{code: {"description": ERRORS[code], "content": ERROR_CONTENT} for code in codes}}


def add_routes(app, model, engine, name):
    """The two routes, when the app allows runtime updating (create_app's allow_runtime_lora_updating)."""
    if not app.state.allow_runtime_lora_updating:
        return

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=responses(400, 401, 403, 413))
    async def load_lora_adapter(body: LoadLoraBody):
        if body.lora_name == name or model.adapters.get(body.lora_name) is not None:
            message = f"The LoRA adapter {body.lora_name!r} has already been loaded."
            raise ApiError(400, message, param="lora_name", code="lora_adapter_exists")
        try:  # reading and checking the folder takes a while: off the event loop
            await run_in_threadpool(model.adapters.add, body.lora_name, body.lora_path)
        except (UsageError, OSError, ValueError, KeyError, SafetensorError) as e:  # KeyError: a config without r...
            message = str(e) if isinstance(e, UsageError) else f"{body.lora_path}: {type(e).__name__}: {e}"
            raise ApiError(400, message, param="lora_path", code="invalid_lora_adapter") from e
        app.openapi_schema = None  # the schema's list of model names follows
        logger.info("loaded the LoRA adapter %r from %s", body.lora_name, body.lora_path)
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=responses(400, 401, 403, 404, 413))
    async def unload_lora_adapter(body: UnloadLoraBody):
        if model.adapters.remove(body.lora_name) is None:
            raise ApiError(
                404, f"The LoRA adapter {body.lora_name!r} cannot be found.", param="lora_name", code="model_not_found"
            )
        app.openapi_schema = None
        logger.info("unloaded the LoRA adapter %r (requests running on it finish with it)", body.lora_name)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
