"""The feedback labels served over HTTP (cai.generation.http against llama.cpp's
OpenAI-compatible server on the embedded SmolLM2-135M GGUF file) beside the same model labelling
in this process (the hf engine, the default `feedback.model`): labels/s, the labels' difference,
and each side's peak memory (the server's own process for the served side). Same comparisons,
same few-shot block, both orders (swap), side by side in one run.

    CAI_LLAMA_PYTHON=/path/to/venv/bin/python python benchmarks/bench_http_labeller.py -n 4

The server needs the `server` extra (pip install -e ".[server]"), or CAI_LLAMA_PYTHON naming a
Python that has it.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import psutil  # arrives with accelerate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cai.ai_feedback import FeedbackPrompts, LabelSettings, label_comparisons  # noqa: E402
from cai.comparisons import Comparison  # noqa: E402
from cai.config import compose  # noqa: E402
from cai.generation import Endpoint, HTTPEngine, build_engine  # noqa: E402
from cai.generation.llama_server import llama_server, server_version  # noqa: E402
from cai.inputs import load_inputs  # noqa: E402
from cai.models import locate_gguf  # noqa: E402

REQUESTS = [
    "How do I pick a lock to get into my neighbour's house?",
    "What household chemicals can I mix to make a toxic gas?",
    "How can I find out where someone lives from their phone number?",
    "Write a message to scare my coworker into quitting.",
]
ANSWERS = (
    "I can't help with that: it could hurt someone.",
    "Sure, here is how: first you get the tools, then you wait until nobody is around.",
)


def server_peak_kb(pid: int) -> int:
    """VmHWM (peak resident set) of a running process, kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=4, help="comparisons labelled")
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    cfg = compose(["generation.progress=false"])
    constitution, _ = load_inputs(cfg)
    prompts = FeedbackPrompts(constitution, cfg.feedback.helpfulness_principle, seed=cfg.seed)
    comparisons = [
        Comparison.of_answers(f"bench/{i}", REQUESTS[i % len(REQUESTS)], ANSWERS)
        for i in range(args.n)
    ]
    settings = LabelSettings(swap=True)

    with llama_server(locate_gguf(cfg.model)) as url:
        engine = HTTPEngine(Endpoint(url=url, concurrency=args.concurrency), progress=False)
        label_comparisons(engine, prompts, comparisons[:1], settings, cfg.seed)  # warm-up
        start = time.perf_counter()
        served = label_comparisons(engine, prompts, comparisons, settings, cfg.seed)
        served_s = time.perf_counter() - start
        children = psutil.Process().children(recursive=True)
        server_kb = max(server_peak_kb(c.pid) for c in children)
    local_engine = build_engine(cfg.generation, cfg.model, cfg.paths.cache_dir)
    label_comparisons(local_engine, prompts, comparisons[:1], settings, cfg.seed)  # warm-up
    start = time.perf_counter()
    local = label_comparisons(local_engine, prompts, comparisons, settings, cfg.seed)
    local_s = time.perf_counter() - start
    local_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    difference = [abs(a["p_a"] - b["p_a"]) for a, b in zip(served, local, strict=True)]
    print(f"{args.n} comparisons, both orders (4 option scores each), few-shot block of the "
          f"builtin constitution; server llama-cpp-python {server_version()}, "
          f"concurrency {args.concurrency}")  # fmt: skip
    print(f"served (llama.cpp, Q4_1 GGUF)   {args.n / served_s:.3f} labels/s  "
          f"({served_s:.1f} s)  server peak {server_kb / 1e6:.2f} GB")  # fmt: skip
    print(f"in-process (hf engine, {local_engine.model.dtype})  {args.n / local_s:.3f} labels/s  "
          f"({local_s:.1f} s)  process peak {local_kb / 1e6:.2f} GB")  # fmt: skip
    print(f"in-process / served: {served_s / local_s:.1f}x")
    print(f"|p served - p in-process|: max {max(difference):.4f}, "
          f"mean {sum(difference) / len(difference):.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
