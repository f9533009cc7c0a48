"""benchmarks/serve_throughput.py's second limit, the one that counts the prompts' prefill compute (a pure function:
the benchmark itself loads a model and serves it, too slow for the fast suite)."""

from benchmarks.serve_throughput import with_prefill


def test_the_prefill_limit_spreads_the_compute_over_prompt_and_completion_tokens():
    # 1152 prompt + 1024 completion tokens (serve_throughput's mix at 32 requests): 1024/2176 of the compute is left
    rate, line = with_prefill((50.0, 1000.0), prompt=1152, completion=1024, clients=8)
    assert rate == 400.0  # 8 x the batch-1 bound of 50 is lower than 1000 * 1024 / 2176 = 470.6
    rate, line = with_prefill((100.0, 1000.0), prompt=1152, completion=1024, clients=8)
    assert round(rate, 1) == 470.6 and "1152 prompt + 1024 completion tokens = 471 completion tokens/s" in line
