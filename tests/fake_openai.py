"""A scripted OpenAI-compatible server for tests: /v1/completions and /v1/chat/completions on 127.0.0.1,
answering in the numbered Instruction/Input/Output format that generate_instruction asks for.

    python tests/fake_openai.py --port 8001          # then --base_url http://127.0.0.1:8001/v1

Faults are consumed one per POST, in order: None (answer normally), "429", "500", "401", "403", "400" (a refusal in
FastAPI's {"detail": ...} shape), "slow" (answer after slow_s seconds, past the client's timeout), "malformed" (text
with no numbered tasks), "length" (the last task cut off, finish_reason "length"). Any other fault goes to answer_fn.
Every POST is logged in .log with its body, fault and the instructions sent. A judge for evaluate.py's tests passes
its own answer_fn.
"""

import json
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORDS = (
    "river apple quiet budget letter garden market teacher window summer bridge engine puzzle recipe "
    "forest harbor ticket student candle ladder mirror pocket rocket saddle tunnel violin wallet yellow "
    "anchor basket castle desert feather glacier hammer island jacket kettle lemon meadow needle orchard "
    "pepper quilt ribbon shadow thunder umbrella valley whistle barrel cactus dolphin falcon ginger helmet "
    "iceberg jungle koala lantern marble nickel oyster parrot quartz raven spider tomato unicorn velvet "
    "walnut zebra copper silver golden narrow gentle clever sudden brave humble ancient modern rapid"
).split()
VERBS = (
    "Explain Describe Summarize Classify Rewrite Suggest List Compare Translate Outline Name Estimate "
    "Identify Recommend Evaluate Define Predict Rank Propose Convert"
).split()
# Tasks the original's filters drop: a blocklisted word, "Write a program", too short.
FILTERED = ["Draw a map of the old harbor town.", "Write a program that sorts these numbers.", "Name three fruits."]


def task_text(rng, k):
    """One numbered task k; every fifth task is one the filters must drop."""
    if k % 5 == 0:
        instruction = FILTERED[k % len(FILTERED)]
    else:
        instruction = f"{rng.choice(VERBS)} " + " ".join(rng.sample(WORDS, rng.randint(5, 9))) + rng.choice(".?")
    task_input = "<noinput>" if rng.random() < 0.6 else " ".join(rng.sample(WORDS, 12)).capitalize() + "."
    output = " ".join(rng.sample(WORDS, rng.randint(6, 20))).capitalize() + "."
    return instruction, f"{k}. Instruction: {instruction}\n{k}. Input:\n{task_input}\n{k}. Output:\n{output}\n"


def answer(prompt, rng, chat, fault):
    """(text, finish_reason, instructions) for one prompt that ends in '###\\n{k}. Instruction:'."""
    if fault == "malformed":
        return "Sure! Some ideas: cooking, travel and sports.", "stop", []
    start = int(re.findall(r"###\n(\d+)\. Instruction:", prompt)[-1])
    tasks = [task_text(rng, k) for k in range(start, 20)]  # a real model stops at "\n20"
    text = "###\n".join(t for _, t in tasks) + "###"
    if not chat:  # a completion continues after the prompt's "{start}. Instruction:"
        text = text[len(f"{start}. Instruction:") :]
    if fault == "length":
        return text[: text.rindex("Output:") + 12], "length", [i for i, _ in tasks]
    return text, "stop", [i for i, _ in tasks]


class FakeOpenAI:
    def __init__(
        self,
        port,
        faults=(),
        delay_s=0.0,
        slow_s=3.0,
        routes=("completions", "chat"),
        context_max_tokens=None,
        models=None,
        answer_fn=None,
        models_status=200,
    ):
        """answer_fn(prompt, rng, chat, fault) -> (text, finish_reason, instructions): what a POST answers (default:
        numbered tasks, as generate_instruction asks for). Faults other than the HTTP ones above are passed to it."""
        self.answer = answer_fn or answer
        self.port, self.faults, self.delay_s, self.slow_s = port, list(faults), delay_s, slow_s
        self.routes, self.context_max_tokens, self.models = routes, context_max_tokens, models
        self.models_status = models_status  # what GET /v1/models answers: 200 with the list, or this error status
        self.log, self.lock, self.stopping = [], threading.Lock(), threading.Event()
        self.base_url = f"http://127.0.0.1:{port}/v1"

    def handle(self, path, body):
        """(status, json payload) for one POST."""
        route = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}.get(path)
        with self.lock:
            fault = self.faults.pop(0) if self.faults else None
            entry = {"path": path, "body": body, "fault": fault, "instructions": []}
            self.log.append(entry)
            n = len(self.log)
        if self.delay_s:
            self.stopping.wait(self.delay_s)
        if route not in self.routes:
            return 404, {"detail": "Not Found"}
        if fault in ("429", "500", "401", "403"):
            return int(fault), {"error": {"message": f"injected {fault}", "type": "fault", "code": fault}}
        if fault == "400":  # refused with a reason outside OpenAI's {"error": {"message"}} shape, as FastAPI apps do
            return 400, {"detail": "prompt must be a string."}
        if fault == "slow":
            self.stopping.wait(self.slow_s)
        if self.models is not None and body.get("model") not in self.models:
            return 404, {
                "error": {"message": f"The model `{body.get('model')}` does not exist.", "code": "model_not_found"}
            }
        if self.context_max_tokens and body.get("max_tokens", 0) > self.context_max_tokens:
            return 400, {
                "error": {
                    "message": "This model's maximum context length is 4096 tokens.",
                    "code": "context_length_exceeded",
                }
            }
        prompts = [body["messages"][-1]["content"]] if route == "chat" else body["prompt"]
        prompts = [prompts] if isinstance(prompts, str) else prompts
        choices = []
        for i, prompt in enumerate(prompts):
            text, finish, instructions = self.answer(prompt, random.Random(f"{n}-{i}"), route == "chat", fault)
            entry["instructions"].append(instructions)
            choices.append(
                {
                    "index": i,
                    "finish_reason": finish,
                    "logprobs": None,
                    **({"message": {"role": "assistant", "content": text}} if route == "chat" else {"text": text}),
                }
            )
        words = sum(len(p.split()) for p in prompts), sum(len(str(c).split()) for c in choices)
        return 200, {
            "id": f"fake-{n}",
            "object": "chat.completion" if route == "chat" else "text_completion",
            "created": 0,
            "model": body.get("model"),
            "choices": choices,
            "usage": {"prompt_tokens": words[0], "completion_tokens": words[1], "total_tokens": sum(words)},
        }

    def __enter__(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                self.reply(*server.handle(self.path, body))

            def do_GET(self):
                if self.path != "/v1/models" or server.models_status != 200:
                    status = 404 if self.path != "/v1/models" else server.models_status
                    return self.reply(status, {"error": {"message": f"injected {status}", "code": str(status)}})
                models = server.models or ["fake-model"]
                self.reply(
                    200, {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "fake"} for m in models]}
                )

            def reply(self, status, payload):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


if __name__ == "__main__":
    import argparse
    import time

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8001)
    with FakeOpenAI(parser.parse_args().port) as fake:
        print(f"serving {fake.base_url}; Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
