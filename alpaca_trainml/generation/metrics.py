"""serve.py's GET /metrics: Prometheus' text format, named as vLLM names its metrics where ours mean the same, so
that dashboards made for vLLM carry over. Every metric has the label model_name, as vLLM's.

- vllm:num_requests_running, vllm:num_requests_waiting (gauges, read at scrape time from the engine);
- vllm:prompt_tokens_total, vllm:generation_tokens_total (counters);
- vllm:prefix_cache_queries_total, vllm:prefix_cache_hits_total: prompt tokens of finished requests, and those of
  them whose keys and values came from the prefix cache (prefix_cache.py), as vLLM counts its prefix cache;
- vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds, vllm:e2e_request_latency_seconds
  (histograms; a beam search has no per-token times, so it adds only to the end-to-end latency);
- vllm:request_success_total{finished_reason}: stop, length, or abort (the client left, or the server stopped) and
  error (the model failed);
- alpaca:lora_requests_total{lora_name}: finished requests per LoRA adapter (serve.py --lora_modules); vLLM has
  only an info gauge of the adapters running, so this one is ours;
- http_requests_total{handler, method, status}: every answer by status code, errors (4xx, 5xx) included, as
  vLLM's prometheus-fastapi-instrumentator counts them; handler is the route, or "other".

/metrics follows --api_key as /instruct and /v1/* do (Prometheus sends a bearer token with `authorization` in its
scrape config); with the default loopback binding it is not reachable from other machines at all."""

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.responses import Response

from alpaca_trainml.generation.engine import Engine, RequestCancelled

# vLLM's buckets (seconds), so that its dashboards' quantiles read the same
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680)


class Metrics:
    """The server's metrics in a registry of its own (several apps can live in one process: tests)."""

    def __init__(self, model_name, engine):
        self.registry, self.name = CollectorRegistry(), model_name
        m, labels = dict(registry=self.registry), ["model_name"]
        for attr, metric, doc, call in [
            ("running", "vllm:num_requests_running", "requests in the running batch", engine.running),
            ("waiting", "vllm:num_requests_waiting", "requests waiting to join the batch", engine.queued),
        ]:
            setattr(self, attr, Gauge(metric, doc, labels, **m))
            getattr(self, attr).labels(model_name).set_function(call)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "prompt tokens of finished requests", labels, **m)
        self.generation_tokens = Counter("vllm:generation_tokens", "tokens generated", labels, **m)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "prompt tokens looked up", labels, **m)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "prompt tokens found in the prefix cache", labels, **m)
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "arrival to first token", labels, buckets=TTFT_BUCKETS, **m
        )
        self.itl = Histogram("vllm:inter_token_latency_seconds", "between tokens", labels, buckets=ITL_BUCKETS, **m)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "arrival to end", labels, buckets=E2E_BUCKETS, **m)
        self.finished = Counter("vllm:request_success", "finished requests", [*labels, "finished_reason"], **m)
        self.lora = Counter("alpaca:lora_requests", "finished requests per LoRA adapter", [*labels, "lora_name"], **m)
        self.http = Counter("http_requests_total", "answers by status", ["handler", "method", "status"], **m)

    def watch(self, job):
        """Count the job when it ends (on the model thread; prometheus_client is thread-safe)."""
        job.future.add_done_callback(lambda future: self._ended(job, future))

    def _ended(self, job, future):
        now, name = time.perf_counter(), self.name
        error = future.exception() if not future.cancelled() else RequestCancelled("cancelled")
        if error is None:
            result = future.result()
            reason, made = result.finish_reason, result.completion_tokens
        else:
            reason = "abort" if isinstance(error, RequestCancelled) or "shutting down" in str(error) else "error"
            made = len(job.token_times)
        self.finished.labels(name, reason).inc()
        if job.adapter is not None:
            self.lora.labels(name, job.adapter.name).inc()
        self.prompt_tokens.labels(name).inc(len(job.ids))
        self.prefix_queries.labels(name).inc(len(job.ids))
        self.prefix_hits.labels(name).inc(job.cached)
        self.generation_tokens.labels(name).inc(made)
        self.e2e.labels(name).observe(now - job.submitted)
        times = job.token_times
        if times:
            self.ttft.labels(name).observe(times[0] - job.submitted)
            for before, after in zip(times, times[1:]):
                self.itl.labels(name).observe(after - before)

    def scrape(self):
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class ObservedEngine(Engine):
    """The engine, counting every job it takes in `metrics`."""

    def __init__(self, model, max_batch_size=8, max_waiting=256, model_name="model"):
        super().__init__(model, max_batch_size, max_waiting)
        self.metrics = Metrics(model_name, self)

    def submit(self, job):
        future = super().submit(job)
        self.metrics.watch(job)
        return future


class CountAnswers:
    """ASGI middleware: http_requests_total by route, method and status; outermost, so refusals count too."""

    def __init__(self, app, metrics, handlers):
        self.app, self.metrics, self.handlers = app, metrics, frozenset(handlers)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        handler = scope["path"] if scope["path"] in self.handlers else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.http.labels(handler, scope["method"], str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counted)
