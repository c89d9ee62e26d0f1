"""llama.cpp's OpenAI-compatible server (llama-cpp-python's `llama_cpp.server`) on this machine,
serving a GGUF file, e.g. the embedded SmolLM2-135M: what the slow test, the recorder of the
fast tests' replies (scripts/record_llama_server.py) and benchmarks/bench_http_labeller.py
label against. Installing it: `pip install -e ".[server]"` (README, "Labellers served over
HTTP").
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from cai.errors import EndpointError

# The Python that runs the server: this one, or one given by CAI_LLAMA_PYTHON (a separate
# environment with llama-cpp-python built for this machine, as a served model usually is)
SERVER_PYTHON = os.environ.get("CAI_LLAMA_PYTHON", sys.executable)


def llama_server_available(python: str = SERVER_PYTHON) -> bool:
    """Whether `python` can run llama_cpp.server (the `server` extra is installed)."""
    if python == sys.executable:
        return importlib.util.find_spec("llama_cpp") is not None and (
            importlib.util.find_spec("uvicorn") is not None
        )
    probe = [python, "-c", "import llama_cpp.server, uvicorn"]
    return subprocess.run(probe, capture_output=True).returncode == 0


def server_version(python: str = SERVER_PYTHON) -> str:
    """The llama-cpp-python version that `python` runs."""
    probe = [python, "-c", "import importlib.metadata as m; print(m.version('llama-cpp-python'))"]
    return subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(
    gguf: Path,
    logits_all: bool = True,
    n_ctx: int = 4096,
    threads: int = 2,
    python: str = SERVER_PYTHON,
    log_file: Path | None = None,
    startup_s: float = 120.0,
) -> Iterator[str]:
    """Start the server on a free loopback port, wait until it answers, yield its base URL
    (http://127.0.0.1:PORT/v1), stop it on exit. `logits_all` must be true for prompt
    log-probabilities (scoring options)."""
    port = free_port()
    command = [
        python, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
        "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads),
        "--logits_all", str(logits_all).lower(), "--seed", "0",
    ]  # fmt: skip
    out = open(log_file, "w") if log_file else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if process.poll() is not None:
                raise EndpointError(
                    f"llama.cpp's server exited (code {process.returncode}) before answering: "
                    f"{' '.join(command)}" + (f"; its log: {log_file}" if log_file else "")
                )
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as reply:
                    json.loads(reply.read())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise EndpointError(
                        f"llama.cpp's server did not answer within {startup_s:g} s"
                    ) from None
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        if log_file:
            out.close()
