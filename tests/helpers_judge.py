"""A real OpenAI-compatible judge for tests, and MT-Bench / AlpacaEval fixtures in the upstream formats.

`JudgeServer` is an HTTP server on 127.0.0.1 (http.server in a thread) answering
`GET /v1/models` and `POST /v1/chat/completions` as a judge would. What it answers is read from
markers the fixtures put in the questions, so every score of a test is known in advance:

- `{rate:N}`: reply "... Rating: [[N]]" (single-answer grading; in a two-turn prompt the marker
  of the second question counts, i.e. the text after the last "### User:");
- `{win}` / `{lose}` / `{tie}`: the pairwise verdict for the evaluated model, whichever side
  (A or B) it was shown on (the reference output is the side starting with "REFERENCE:");
- `{malformed}`: never a readable verdict; `{malformed-once}`: not on the first attempt;
- `{429-once}`, `{500-once}`: that HTTP status on the first attempt (Retry-After: 10 ms);
- `{slow-once}`: the first attempt answers after `slow_s` seconds (longer than the client waits);
- `{reject}`: HTTP 400 on every attempt.

Attempts are counted per conversation (the sha256 of its messages, as the judge's cache records
it). Run as a script (`helpers_judge.py serve --port P --served-model-name M ...`) it stands in
for vLLM's server in tests of `evaluate.judge.serve`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_MARK = re.compile(r"\{(rate:\d+|win|lose|tie|malformed|malformed-once|429-once|500-once|slow-once|reject)\}")


def digest(messages) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class JudgeServer:
    def __init__(self, model: str = "judge-test", api_key: str | None = None, slow_s: float = 1.5,
                 delay_s: float = 0.0, port: int = 0):
        self.model, self.api_key, self.slow_s, self.delay_s = model, api_key, slow_s, delay_s
        self.requests: list[dict] = []  # every chat request: digest, messages, attempt, status
        self.attempts: Counter = Counter()
        self.in_flight = self.max_in_flight = 0  # chat requests being answered at once
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict, headers: dict | None = None):
                data = json.dumps(body).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _authorized(self) -> bool:
                if server.api_key is None or self.headers.get("Authorization") == f"Bearer {server.api_key}":
                    return True
                self._send(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
                return False

            def do_GET(self):
                if not self._authorized():
                    return
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model", "created": 0,
                                                                 "owned_by": "tests"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not self._authorized():
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": "not found"}})
                    return
                if body.get("model") != server.model:
                    self._send(404, {"error": {"message": f"model {body.get('model')} does not exist"}})
                    return
                messages = body["messages"]
                key = digest(messages)
                with server.lock:
                    server.attempts[key] += 1
                    attempt = server.attempts[key]
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer(body, messages, key, attempt)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, body, messages, key, attempt):
                status, text, headers, sleep = server.decide(messages, attempt)
                with server.lock:  # recorded on arrival (a slow reply's client may have given up)
                    server.requests.append({"digest": key, "messages": messages, "attempt": attempt, "status": status,
                                            "reply": text, "temperature": body.get("temperature"),
                                            "max_tokens": body.get("max_tokens"), "slow": sleep >= server.slow_s})
                if sleep:
                    time.sleep(sleep)
                if status != 200:
                    self._send(status, {"error": {"message": text, "type": "test"}}, headers)
                    return
                self._send(200, {"id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion", "created": 0,
                                 "model": server.model,
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "JudgeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def ok_replies(self) -> list[dict]:
        """Requests answered 200 in time (not the slow first attempts the client gave up on)."""
        with self.lock:
            return [r for r in self.requests if r["status"] == 200 and not r["slow"]]

    # -- the judge's behaviour -----------------------------------------------------------------
    def decide(self, messages, attempt: int):
        """(status, reply text, headers, seconds to wait first)."""
        user = messages[-1]["content"]
        pairwise = "[Assistant B]" in user
        segment = user if pairwise else user.rsplit("### User:", 1)[-1]
        marks = set(_MARK.findall(segment))
        delay = self.delay_s
        if "reject" in marks:
            return 400, "this prompt is rejected", {}, delay
        if attempt == 1 and "429-once" in marks:
            return 429, "rate limited", {"retry-after-ms": "10"}, delay
        if attempt == 1 and "500-once" in marks:
            return 500, "server error", {"retry-after-ms": "10"}, delay
        if attempt == 1 and "slow-once" in marks:
            delay = self.slow_s
        if "malformed" in marks or (attempt == 1 and "malformed-once" in marks):
            return 200, "The answer is fine. Rating: 7 out of 10.", {}, delay
        if pairwise:
            ref_first = user.find("REFERENCE:") < user.find("[Assistant B]")
            model_side, ref_side = ("B", "A") if ref_first else ("A", "B")
            verdict = {"win": model_side, "lose": ref_side, "tie": "C"}[next(m for m in ("win", "lose", "tie") if m in marks)]
            return 200, f"Both are short. [[{verdict}]]", {}, delay
        rating = [m for m in _MARK.findall(segment) if m.startswith("rate:")][-1].split(":")[1]
        return 200, f"A short explanation. Rating: [[{rating}]]", {}, delay


# -- fixtures in the upstream formats ------------------------------------------------------------

# Our own short judge prompts with FastChat's names, fields and output formats (judge_prompts.jsonl).
JUDGE_PROMPTS = [
    {"name": "pair-v2", "type": "pairwise", "system_prompt": "Compare two answers. End with [[A]], [[B]] or [[C]].",
     "prompt_template": "[User Question]\n{question}\n\n[Assistant A]\n{answer_a}\n[End A]\n\n[Assistant B]\n{answer_b}\n[End B]",
     "description": "test", "category": "general", "output_format": "[[A]]"},
    {"name": "single-v1", "type": "single", "system_prompt": "You grade answers.",
     "prompt_template": "GRADE-T1\n[Question]\n{question}\n\n[Answer]\n{answer}\n[End]",
     "description": "test", "category": "general", "output_format": "[[rating]]"},
    {"name": "single-math-v1", "type": "single", "system_prompt": "You grade answers against a reference.",
     "prompt_template": "GRADE-MATH-T1\n[Question]\n{question}\n\n[Reference]\n{ref_answer_1}\n[End]\n\n[Answer]\n{answer}\n[End]",
     "description": "test", "category": "math", "output_format": "[[rating]]"},
    {"name": "single-v1-multi-turn", "type": "single", "system_prompt": "Grade the second answer.",
     "prompt_template": "GRADE-T2\n### User:\n{question_1}\n\n### Assistant A:\n{answer_1}\n\n"
                        "### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n",
     "description": "test", "category": "general", "output_format": "[[rating]]"},
    {"name": "single-math-v1-multi-turn", "type": "single", "system_prompt": "Grade the second answer against the reference.",
     "prompt_template": "GRADE-MATH-T2\n### User:\n{question_1}\n\n### Reference answer:\n{ref_answer_1}\n\n"
                        "### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n"
                        "### User:\n{question_1}\n\n### Assistant A:\n{answer_1}\n\n"
                        "### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n",
     "description": "test", "category": "math", "output_format": "[[rating]]"},
]

# (question_id, category, turn 1, turn 2); reference answers for math / reasoning / coding.
MT_BENCH = [
    (81, "writing", "Write a line. {rate:8}", "Shorter. {rate:6}"),
    (111, "math", "Add 2 and 3. {rate:3} {malformed-once}", "Times 4? {rate:5} {429-once}"),
    (91, "roleplay", "Be a cat. {rate:7} {slow-once}", "Again. {rate:9}"),
    (121, "coding", "Print hi. {rate:2}", "In C. {rate:4} {malformed}"),
]
REFERENCES = {111: ["5", "20"], 121: ["print('hi')", "puts(\"hi\");"]}
# Hand-derived from the markers: the turn with {malformed} fails; the rest are rated.
MT_BENCH_EXPECTED = {
    "mt_bench": (8 + 6 + 3 + 5 + 7 + 9 + 2) / 7,
    "mt_bench_by_category": {"writing": 7.0, "math": 4.0, "roleplay": 8.0, "coding": 2.0},
    "mt_bench_by_turn": {"1": (8 + 3 + 7 + 2) / 4, "2": (6 + 5 + 9) / 3},
    "mt_bench_judged": 7,
    "mt_bench_failures": 1,
}

ALPACA_EVAL = [
    ("Name a colour. {win}", "REFERENCE: blue, a colour of the sky and the sea."),
    ("Name a fruit. {lose}", "REFERENCE: apple."),
    ("Name a tree. {tie}", "REFERENCE: oak, a long-lived tree."),
    ("Name a bird. {win} {500-once}", "REFERENCE: robin."),
    ("Name a fish. {malformed}", "REFERENCE: trout, a fish."),
    ("Name a stone. {win}", "REFERENCE: granite, a hard stone used in buildings."),
]
ALPACA_EXPECTED = {"alpaca_eval_wr": 100 * (1 + 0 + 0.5 + 1 + 1) / 5, "alpaca_eval_judged": 5, "alpaca_eval_failures": 1}
# Judge calls of one model with max_retries R: one per turn / item, plus the retries the markers cause.
def expected_calls(max_retries: int) -> int:
    mt = 8 + 1 + 1 + 1 + max_retries  # malformed-once, 429-once, slow-once, malformed (1 + R attempts)
    ae = 6 + 1 + max_retries  # 500-once, malformed
    return mt + ae


def write_judge_data(root: Path, mt_bench=MT_BENCH, references=REFERENCES, alpaca=ALPACA_EVAL) -> Path:
    """data_dir/mt_bench/{question.jsonl, judge_prompts.jsonl, reference_answer/gpt-4.jsonl} and
    data_dir/alpaca_eval/alpaca_eval.json, in FastChat's and AlpacaEval's formats."""
    mt = root / "mt_bench"
    (mt / "reference_answer").mkdir(parents=True, exist_ok=True)
    (mt / "question.jsonl").write_text("".join(
        json.dumps({"question_id": qid, "category": cat, "turns": [t1, t2]}) + "\n" for qid, cat, t1, t2 in mt_bench),
        encoding="utf-8")
    (mt / "judge_prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in JUDGE_PROMPTS), encoding="utf-8")
    (mt / "reference_answer" / "gpt-4.jsonl").write_text("".join(
        json.dumps({"question_id": qid, "answer_id": f"a{qid}", "model_id": "gpt-4",
                    "choices": [{"index": 0, "turns": turns}], "tstamp": 0.0}) + "\n"
        for qid, turns in references.items()), encoding="utf-8")
    ae = root / "alpaca_eval"
    ae.mkdir(parents=True, exist_ok=True)
    (ae / "alpaca_eval.json").write_text(json.dumps(
        [{"instruction": i, "output": o, "generator": "reference_model", "dataset": "tests"} for i, o in alpaca],
        indent=2), encoding="utf-8")
    return root


def main(argv=None) -> int:
    """`serve --port P --served-model-name M [...]`: a stand-in for vLLM's OpenAI server."""
    import argparse
    import signal

    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["serve"])
    p.add_argument("-m", dest="module")
    p.add_argument("--model")
    p.add_argument("--served-model-name")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    args, _ = p.parse_known_args(argv)
    print(f"stand-in judge server for {args.model} as {args.served_model_name} on {args.host}:{args.port}", flush=True)
    server = JudgeServer(model=args.served_model_name, port=args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    with server:
        stop.wait()
    print("stopped on SIGTERM", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
