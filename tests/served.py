"""OpenAI-compatible completions servers on the loopback interface, for the HTTP labeller's tests:

- `ModelServer`: a real transformers model (the tiny random model in tests) behind the
  completions API: prompt log-probabilities with `echo` + `logprobs`, greedy or sampled
  completions with stop strings; faults on demand (HTTP 503 after n requests, a slow reply, no
  log-probabilities).
- `ReplayServer`: replies recorded from llama.cpp's server (tests/data/llama_server_replies.json.gz,
  made by scripts/record_llama_server.py), looked up by the request's JSON.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

RECORDING = Path(__file__).parent / "data" / "llama_server_replies.json.gz"


def canonical(body: dict) -> str:
    return json.dumps(body, sort_keys=True)


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 whose POST .../completions calls `self.reply(body)`,
    which returns (status, JSON-able reply)."""

    def __enter__(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(body)
                owner.headers.append(dict(self.headers))
                status, reply = owner.reply(body)
                data = json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left (the timeout tests)

            def log_message(self, *args):
                pass

        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class ReplayServer(_Server):
    def __init__(self, recording: dict):
        self.replies = {canonical(x["request"]): x["response"] for x in recording["exchanges"]}

    def reply(self, body):
        found = self.replies.get(canonical(body))
        return (200, found) if found is not None else (404, {"error": "not recorded"})


def load_recording() -> dict:
    with gzip.open(RECORDING, "rt") as f:
        return json.load(f)


class ModelServer(_Server):
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.fail_after: int | None = None  # answer HTTP 503 once this many requests are served
        self.fail_status = 503
        self.delay_s = 0.0  # sleep before each reply (timeouts)
        self.logprobs = True  # false: a server that returns no log-probabilities
        self.lock = threading.Lock()
        self.served = 0

    def reply(self, body):
        time.sleep(self.delay_s)
        with self.lock:
            if self.fail_after is not None and self.served >= self.fail_after:
                return self.fail_status, {"error": {"message": "server overloaded"}}
            self.served += 1
            return 200, self.complete(body)

    @torch.no_grad()
    def complete(self, body: dict) -> dict:
        prompt = body["prompt"]
        encoded = self.tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)
        ids = list(encoded["input_ids"])
        offsets = [start for start, _ in encoded["offset_mapping"]]
        generator = torch.Generator().manual_seed(int(body.get("seed", 0)))
        new_ids = []
        for _ in range(int(body.get("max_tokens", 16))):
            logits = self.model(torch.tensor([ids + new_ids])).logits[0, -1].float()
            temperature = float(body.get("temperature", 1.0))
            if temperature == 0:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, -1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            if token == self.tokenizer.eos_token_id:
                break
            new_ids.append(token)
        text = self.tokenizer.decode(new_ids)
        finish = "length" if len(new_ids) == int(body.get("max_tokens", 16)) else "stop"
        for stop in body.get("stop") or []:
            if stop in text:
                text, finish = text[: text.index(stop)], "stop"
        choice = {"index": 0, "text": (prompt + text) if body.get("echo") else text,
                  "finish_reason": finish, "logprobs": None}  # fmt: skip
        if body.get("logprobs") is not None and self.logprobs and body.get("echo"):
            logits = self.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            values = [None] + [float(logits[i - 1, ids[i]]) for i in range(1, len(ids))]
            tokens = [
                prompt[offsets[i] : offsets[i + 1] if i + 1 < len(ids) else len(prompt)]
                for i in range(len(ids))
            ]
            choice["logprobs"] = {
                "tokens": tokens + [text],
                "token_logprobs": values + [0.0],
                "text_offset": offsets + [len(prompt)],
                "top_logprobs": None,
            }
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(new_ids)}
        return {"id": "cmpl-test", "object": "text_completion", "choices": [choice],
                "usage": usage}  # fmt: skip
