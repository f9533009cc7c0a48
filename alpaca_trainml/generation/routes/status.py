"""GET /health: the model, its limits and the engine's load; the web page reads its defaults and ranges here.
GET /metrics: Prometheus' text format (generation/metrics.py), behind --api_key as the model routes are."""

from fastapi.responses import PlainTextResponse

from alpaca_trainml.generation.api_schema import error_responses
from alpaca_trainml.generation.decoding import generation_limits


def add_routes(app, model, engine, name):
    @app.get("/health", responses=error_responses("open"))
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

    @app.get("/metrics", response_class=PlainTextResponse, responses=error_responses("read"))
    async def metrics():
        return engine.metrics.scrape()
