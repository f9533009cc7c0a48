"""evaluate.py beside alpaca_eval: the same model and reference outputs, the same OpenAI-compatible judge, both win
rates and both length-controlled win rates, in one run.

    python -m benchmarks.peers_judging                                   # the project's eval sample, scripted judge
    python -m benchmarks.peers_judging --model_outputs out/eval/demo.json --reference_outputs out/eval/base.json

The judge is scripted and served here on 127.0.0.1 (OpenAI chat completions): it reads the two outputs a prompt shows
and prefers the one with the higher score, words + 20 x a hash of the text in [0, 1), whichever order they are shown
in, so both tools get the same verdict for the same pair and their raw win rates must be equal. Both tools send it
evaluate.py's judge prompt (alpaca_eval through an annotator config with that template and a client config whose
base_url is this server); both shuffle which output is shown first, each its own way. alpaca_eval runs in
.venv-peers (`make peers`) through benchmarks/peers_alpaca_eval.py. Without --model_outputs the pairs are made here
from data/sample_eval.json: its answers as the reference, and for the model a shorter, a longer, another row's, or
the same answer. Inputs are folded into the instruction (AlpacaEval has no input field).

Last line: both raw win rates, then both length-controlled ones (or why alpaca_eval has none).
"""

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from alpaca_trainml import REPO_ROOT, jsonio
from alpaca_trainml.evaluation import formats, judging
from benchmarks.peer_process import PeerFailed, run_peer

PEERS_PYTHON = REPO_ROOT / ".venv-peers" / "bin" / "python"
SHOWN = re.compile(r"\nOutput \(a\):\n(.*)\n\nOutput \(b\):\n(.*)\n\nWhich output is better\?", re.S)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_outputs", default=None, help="AlpacaEval model_outputs JSON (default: made here)")
    p.add_argument("--reference_outputs", default=None, help="AlpacaEval reference outputs JSON")
    p.add_argument("--eval_set", default=str(REPO_ROOT / "data" / "sample_eval.json"), help="rows to make pairs from")
    p.add_argument("--work_dir", default=None, help="keep every file here (default: a temporary folder)")
    p.add_argument("--peers_python", default=str(PEERS_PYTHON))
    return p.parse_args(argv)


def score(text):
    """The scripted judge's taste: longer is better, with a deterministic hash of the text as noise."""
    noise = int(hashlib.sha256(text.strip().encode()).hexdigest()[:8], 16) / 2**32
    return len(text.split()) + 20 * noise


def verdict(prompt):
    shown = SHOWN.search(prompt)
    if shown is None:
        return "I cannot find the two outputs."
    a, b = shown.group(1), shown.group(2)
    return "Output (a)" if score(a) >= score(b) else "Output (b)"


class ScriptedJudge:
    """An OpenAI-compatible judge on 127.0.0.1 (chat and completions routes), started and always stopped."""

    def __enter__(self):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                chat = self.path.endswith("/chat/completions")
                prompt = body["messages"][-1]["content"] if chat else body["prompt"]
                text = verdict(prompt if isinstance(prompt, str) else prompt[0])
                choice = {"index": 0, "finish_reason": "stop", "logprobs": None}
                choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                payload = dict(
                    id="judge",
                    object="chat.completion" if chat else "text_completion",
                    created=0,
                    model=body.get("model"),
                    choices=[choice],
                    usage=dict(prompt_tokens=1, completion_tokens=1, total_tokens=2),
                )
                self.reply(payload)

            def do_GET(self):  # the model list evaluate.py asks for first, to check the server
                self.reply({"object": "list", "data": [{"id": "judge", "object": "model", "owned_by": "benchmark"}]})

            def reply(self, payload):
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # a free port
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def folded(row):
    """AlpacaEval's row for an Alpaca row: the input, if any, goes into the instruction."""
    instruction = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return dict(instruction=instruction, output=row["output"])


def made_pairs(eval_set):
    """(model rows, reference rows) from an eval set with answers: for the model, row i's answer cut to its first
    sentence, lengthened by the next row's, replaced by the next row's, or kept (a draw), by i mod 4."""
    rows = [folded(r) for r in formats.load_rows(eval_set, "eval_set", needs_output=True)]
    model = []
    for i, row in enumerate(rows):
        other = rows[(i + 1) % len(rows)]["output"]
        first = re.split(r"(?<=[.!?])\s", row["output"], maxsplit=1)[0]
        output = [first, f"{row['output']} {other}", other, row["output"]][i % 4]
        model.append(dict(row, output=output, generator="variant"))
    return model, [dict(r, generator="sample_eval") for r in rows]


def run(cmd, what):
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"peers_judging: {what} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def compare(ours_annotations, theirs_annotations):
    """Pairs whose preference differs between the two tools' annotations (matched on the instruction)."""
    theirs = {a["instruction"]: a["preference"] for a in theirs_annotations}
    return [a["instruction"] for a in ours_annotations if theirs.get(a["instruction"], "missing") != a["preference"]]


def main(argv=None):
    args = parse_args(argv)
    if not Path(args.peers_python).exists():
        raise SystemExit(f"peers_judging: no {args.peers_python}; run `make peers` first (alpaca_eval in .venv-peers)")
    with tempfile.TemporaryDirectory() as tmp, ScriptedJudge() as judge:
        work = Path(args.work_dir or tmp)
        if args.model_outputs:
            model = [folded(r) | {"generator": r.get("generator", "model")} for r in jsonio.jload(args.model_outputs)]
            reference = [
                folded(r) | {"generator": r.get("generator", "reference")} for r in jsonio.jload(args.reference_outputs)
            ]
        else:
            model, reference = made_pairs(args.eval_set)
        jsonio.jdump(model, work / "model_outputs.json")
        jsonio.jdump(reference, work / "reference_outputs.json")
        template = judging.JUDGE_PROMPT.replace("{input}", "(none)")
        (work / "judge_prompt.txt").write_text(
            template.replace("{output_a}", "{output_1}").replace("{output_b}", "{output_2}")
        )
        ours_cmd = [sys.executable, "evaluate.py", "judge", "--model_outputs", str(work / "model_outputs.json")]
        ours_cmd += ["--reference_outputs", str(work / "reference_outputs.json"), "--judge_model", "scripted-judge"]
        ours_cmd += ["--base_url", judge.base_url, "--api_key", "not-needed", "--output_dir", str(work / "ours")]
        ours_line = run(ours_cmd, "evaluate.py judge").strip().splitlines()[-1]
        theirs_cmd = [args.peers_python, "-m", "benchmarks.peers_alpaca_eval", "--work", str(work)]
        try:  # the peer in its own process, with a time limit: its crash is a finding, not the run's end
            run_peer("alpaca_eval", theirs_cmd + ["--base_url", judge.base_url], timeout=1800, cwd=REPO_ROOT)
        except PeerFailed as e:
            print(f"{len(model)} pairs. evaluate.py: {ours_line}\nalpaca_eval: FAILED: {e}")
            print(f"peers_judging: evaluate.py {ours_line}; alpaca_eval failed")
            return
        report(work, ours_line, len(model))


def report(work, ours_line, n):
    theirs = json.loads((work / "alpaca_eval" / "result.json").read_text())
    ours_annotations = formats.load_annotations(work / "ours" / "annotations.json")
    theirs_path = next((work / "alpaca_eval").rglob("annotations.json"))
    theirs_annotations = formats.load_annotations(theirs_path)
    ours, rescored = judging.summarize(ours_annotations), judging.summarize(theirs_annotations)
    differ = compare(ours_annotations, theirs_annotations)
    print(f"{n} pairs. evaluate.py: {ours_line}")
    print(f"alpaca_eval: win rate {theirs['win_rate']:.2f} ± {theirs['standard_error']:.2f}")
    print(f"pairs judged differently: {len(differ)}" + (f" (first: {differ[0][:60]!r})" if differ else ""))
    print(
        f"evaluate.py's statistics on alpaca_eval's annotations: win rate {rescored['win_rate']:.2f}, "
        f"length-controlled {rescored['length_controlled_win_rate']:.2f}"
    )
    if "length_controlled" in theirs:
        their_lc = f"{theirs['length_controlled']:.1f}"
    else:
        their_lc = "none"
        print(
            f"alpaca_eval's length-controlled win rate: none ({theirs['length_controlled_error']}); it needs "
            "AlpacaEval's instruction difficulty for its 805 instructions and its gamed baselines (df_gamed.csv "
            "from the hub); evaluate.py fits length alone, one model against one reference."
        )
    print(
        f"alpaca_eval's GLM without instruction difficulty (length_controlled_minimal, its L1 CV fit): "
        f"{theirs['length_controlled_minimal']:.2f}; evaluate.py's (ridge logistic): "
        f"{ours['length_controlled_win_rate']:.2f}"
    )
    equal = "equal" if abs(ours["win_rate"] - theirs["win_rate"]) < 1e-9 else "DIFFERENT"
    print(
        f"peers_judging: win rate evaluate.py {ours['win_rate']:.1f} alpaca_eval {theirs['win_rate']:.1f} ({equal}); "
        f"length-controlled evaluate.py {ours['length_controlled_win_rate']:.1f} alpaca_eval {their_lc} "
        f"(its GLM without difficulty {theirs['length_controlled_minimal']:.1f})"
    )


if __name__ == "__main__":
    main()
