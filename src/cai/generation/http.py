"""A labeller served over HTTP: any OpenAI-compatible completions endpoint (vLLM, TGI, SGLang,
llama.cpp's server) as a generation engine, for the AI feedback labels, the AI-feedback judge
and their chain-of-thought reasoning (`feedback.model=http`, `eval.ai_feedback.model=http`).

- `score`: each option is scored by one request whose prompt is `prefix + context + option`,
  with `echo` and `logprobs`: the server returns the log-probability of every prompt token, and
  the option's score is the sum over the tokens that cover its text (by `text_offset`), as the
  in-process engine sums them (Bai et al. 2022, section 4.1: the normalised probabilities of
  " (A)" and " (B)").
- `generate`: one completion per request (`max_tokens`, `temperature`, `top_p`, `stop`, `seed`).

Requests run `concurrency` at a time; results come back in request order whatever finishes
first. A request that times out, fails to connect or gets HTTP 429/5xx is retried `retries`
times with exponential backoff; then, or at once for a refusal (another 4xx) or a reply without
log-probabilities, one EndpointError names the setting and says what to do. The stages label by
resumable chunks, so the chunks finished before the error are kept.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm.auto import tqdm

from cai.errors import EndpointError
from cai.generation.base import Generation, GenerationEngine, OptionScores, Request, ScoreRequest

RETRIED_STATUS = {408, 429, 500, 502, 503, 504}
NO_LOGPROBS = (
    "{e.setting}.url={e.url}: the server returned no prompt log-probabilities (echo=true, "
    "logprobs=1). Scoring needs them: vLLM, or llama.cpp's python server started with "
    "--logits_all true; a server that only returns log-probabilities of generated tokens "
    "cannot score options."
)


@dataclass(frozen=True)
class Endpoint:
    """Where the labeller is served and how to call it (`<stage>.endpoint` in the config)."""

    url: str  # base URL, e.g. http://gpu-node:8000/v1 (".../completions" is added)
    model: str = ""  # the served model's name ("" for servers that serve one model)
    api_key_env: str | None = None  # environment variable holding the API key, if any
    concurrency: int = 4  # requests in flight at once
    timeout_s: float = 120.0  # per request
    retries: int = 3  # extra tries after a timeout, a refused connection or HTTP 429/5xx
    backoff_s: float = 1.0  # wait before the first retry, doubled each time
    setting: str = "feedback.endpoint"  # named in every error

    @property
    def completions_url(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/completions") else f"{base}/completions"


class HTTPEngine(GenerationEngine):
    tokenizer = None  # the served model's tokenizer is the server's

    def __init__(self, endpoint: Endpoint, progress: bool = True):
        if not endpoint.url or not endpoint.url.startswith(("http://", "https://")):
            raise EndpointError(
                f"{endpoint.setting}.url={endpoint.url!r}: give the server's base URL, e.g. "
                f"{endpoint.setting}.url=http://localhost:8000/v1."
            )
        self.endpoint = endpoint
        self.progress = progress
        self.headers = {"Content-Type": "application/json"}
        if endpoint.api_key_env:
            key = os.environ.get(endpoint.api_key_env)
            if not key:
                raise EndpointError(
                    f"{endpoint.setting}.api_key_env={endpoint.api_key_env}: that environment "
                    "variable is not set. Export the API key in it, or set api_key_env=null."
                )
            self.headers["Authorization"] = f"Bearer {key}"
        self.stats = {"requests": 0, "retries": 0, "wall_s": 0.0}
        self._count_lock = threading.Lock()  # requests are posted from `concurrency` threads
        self.transcript: list[dict] | None = None  # a list: every request and reply is kept

    # -- the two engine calls ----------------------------------------------------------------

    def score(
        self, requests: list[ScoreRequest], prefix: str = "", desc: str = "score"
    ) -> list[OptionScores]:
        jobs = [(prefix + r.context, o) for r in requests for o in r.options]
        scored = self._map(lambda job: self._score_option(*job), jobs, desc)
        out, at = [], 0
        for r in requests:
            chunk = scored[at : at + len(r.options)]
            at += len(r.options)
            out.append(OptionScores(tuple(s for s, _ in chunk), tuple(n for _, n in chunk)))
        return out

    def generate(
        self,
        requests: list[Request],
        prefix: str = "",
        desc: str = "generate",
        keep_state: bool = False,
        states: list | None = None,
    ) -> list[Generation]:
        return self._map(lambda r: self._generate_one(prefix, r), requests, desc)

    # -- one request each ----------------------------------------------------------------------

    def _score_option(self, context: str, option: str) -> tuple[float, int]:
        """Sum of log p(token) over the tokens of `option` after `context`, and their count."""
        prompt = context + option
        # max_tokens=1: some servers read 0 as "up to the context length"; the one generated
        # token is ignored (its offset is past the prompt)
        body = {"prompt": prompt, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 1}
        choice = self._post(body)["choices"][0]
        logprobs = choice.get("logprobs") or {}
        offsets, values = logprobs.get("text_offset"), logprobs.get("token_logprobs")
        if not offsets or not values or len(offsets) != len(values):
            raise EndpointError(NO_LOGPROBS.format(e=self.endpoint))
        # a token belongs to the option when it ends past the context (a token that straddles
        # the boundary is counted: it is the same for every option of the context and cancels)
        tokens = logprobs.get("tokens") or [""] * len(offsets)
        start, end = len(context), len(prompt)
        total, count = 0.0, 0
        for offset, value, token in zip(offsets, values, tokens, strict=True):
            if offset >= end:
                break  # the generated token
            if offset + max(len(token), 1) > start:
                if value is None:
                    raise EndpointError(
                        f"{self.endpoint.setting}: the server gave no log-probability for the "
                        f"option token {token!r}; the context must not be empty."
                    )
                total, count = total + float(value), count + 1
        if count == 0:
            raise EndpointError(
                f"{self.endpoint.setting}: no prompt token covers the option {option!r} in the "
                "server's reply (its text_offset values do not match the prompt)."
            )
        return total, count

    def _generate_one(self, prefix: str, request: Request) -> Generation:
        body = {
            "prompt": prefix + request.prompt,
            "max_tokens": request.max_new_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
        }
        if request.stop:
            body["stop"] = list(request.stop)
        reply = self._post(body)
        choice = reply["choices"][0]
        usage = reply.get("usage") or {}
        return Generation(
            text=(choice.get("text") or "").strip(),  # as every engine gives it (hf.py)
            num_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
        )

    # -- transport -----------------------------------------------------------------------------

    def _map(self, fn, items: list, desc: str) -> list:
        if not items:
            return []
        start = time.perf_counter()
        bar = tqdm(total=len(items), desc=desc, unit="req", leave=False, disable=not self.progress)
        with ThreadPoolExecutor(max_workers=self.endpoint.concurrency) as pool:
            futures = [pool.submit(fn, item) for item in items]
            results = []
            try:
                for future in futures:  # in request order
                    results.append(future.result())
                    bar.update(1)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
            finally:
                bar.close()
        self.stats["wall_s"] += time.perf_counter() - start
        return results

    def _post(self, body: dict) -> dict:
        e = self.endpoint
        body = {"model": e.model, **body} if e.model else body
        payload = json.dumps(body).encode()
        wait, last = e.backoff_s, ""
        for attempt in range(e.retries + 1):
            if attempt:
                self._count("retries")
                time.sleep(wait)
                wait *= 2
            request = urllib.request.Request(e.completions_url, payload, self.headers)
            try:
                with urllib.request.urlopen(request, timeout=e.timeout_s) as response:
                    self._count("requests")
                    reply = _parse(response.read(), e)
                if self.transcript is not None:
                    self.transcript.append({"request": body, "response": reply})
                return reply
            except urllib.error.HTTPError as error:
                detail = error.read().decode(errors="replace")[:300]
                if "logprob" in detail.lower() and body.get("echo"):
                    raise EndpointError(f"{NO_LOGPROBS.format(e=e)} The server said: "
                                        f"HTTP {error.code}: {detail.strip()}") from error  # fmt: skip
                if error.code not in RETRIED_STATUS:
                    raise EndpointError(
                        f"{e.setting}.url={e.url}: the server refused the request (HTTP "
                        f"{error.code}: {detail.strip()}). Check {e.setting}.model and that the "
                        "server serves the completions API."
                    ) from error
                last = f"HTTP {error.code}: {detail.strip()}"
            except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as error:
                reason = getattr(error, "reason", error)
                last = f"timed out after {e.timeout_s:g} s" if _is_timeout(reason) else str(reason)
        raise EndpointError(
            f"{e.setting}.url={e.url}: no answer after {e.retries + 1} tries ({last}). Check that "
            f"the server is up and reachable, or raise {e.setting}.timeout_s / retries; the "
            "chunks already labelled are kept, and the same command resumes."
        )

    def _count(self, what: str) -> None:
        with self._count_lock:
            self.stats[what] += 1


def _is_timeout(reason) -> bool:
    return isinstance(reason, TimeoutError) or "timed out" in str(reason)


def _parse(raw: bytes, e: Endpoint) -> dict:
    try:
        reply = json.loads(raw)
    except ValueError as error:
        raise EndpointError(
            f"{e.setting}.url={e.url}: the reply is not JSON ({raw[:120]!r}). Is this an "
            "OpenAI-compatible completions endpoint?"
        ) from error
    if not isinstance(reply, dict) or not reply.get("choices"):
        raise EndpointError(
            f"{e.setting}.url={e.url}: the reply has no choices ({str(reply)[:200]}). Is this "
            "an OpenAI-compatible completions endpoint?"
        )
    return reply
