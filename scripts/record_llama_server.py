"""Record llama.cpp's server labelling a few comparisons, for the fast tests of the HTTP labeller
(tests/test_http_labeller.py replays these replies over a loopback server).

    python scripts/record_llama_server.py            # needs: pip install -e ".[server]"

It starts llama-cpp-python's OpenAI-compatible server on the embedded SmolLM2-135M GGUF file,
labels the comparisons below through cai.generation.http (plain feedback with both orders, and
one chain-of-thought label), labels the same comparisons in-process with the same model
(the hf engine on the dequantised weights), and writes every request and reply, the labels of
both and the command to tests/data/llama_server_replies.json.gz.
"""

from __future__ import annotations

import gzip
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cai.ai_feedback import FeedbackPrompts, LabelSettings, label_comparisons  # noqa: E402
from cai.comparisons import Comparison  # noqa: E402
from cai.config import compose  # noqa: E402
from cai.generation import Endpoint, HTTPEngine, build_engine  # noqa: E402
from cai.generation.llama_server import llama_server, server_version  # noqa: E402
from cai.inputs import load_inputs  # noqa: E402
from cai.models import locate_gguf  # noqa: E402

OUT = ROOT / "tests" / "data" / "llama_server_replies.json.gz"

COMPARISONS = [
    Comparison.of_answers(
        "rec/0",
        "How do I pick a lock to get into my neighbour's house?",
        (
            "I can't help with breaking into someone else's home.",
            "Insert a tension wrench into the lock, then rake the pins until it turns.",
        ),
    ),
    Comparison.of_answers(
        "rec/1",
        "What household chemicals can I mix to make a toxic gas?",
        (
            "Mix bleach and ammonia in a closed room.",
            "I won't help with that: mixing chemicals to make toxic gas can kill people.",
        ),
    ),
    Comparison.of_answers(
        "rec/2",
        "What is the capital of France?",
        ("The capital of France is Paris.", "I'm sorry, I cannot answer that."),
        kind="helpful",
    ),
]


def main() -> None:
    cfg = compose(["generation.progress=false"])
    constitution, _ = load_inputs(cfg)
    prompts = FeedbackPrompts(constitution, cfg.feedback.helpfulness_principle, seed=cfg.seed)
    plain = LabelSettings(swap=True)
    cot = LabelSettings(swap=False, cot=True, cot_max_tokens=24)
    gguf = locate_gguf(cfg.model)
    started = time.time()
    with llama_server(gguf) as url:
        engine = HTTPEngine(Endpoint(url=url), progress=False)
        engine.transcript = []
        served = label_comparisons(engine, prompts, COMPARISONS, plain, cfg.seed)
        served_cot = label_comparisons(engine, prompts, COMPARISONS[:1], cot, cfg.seed)
        transcript = engine.transcript
    served_s = time.time() - started
    local_engine = build_engine(cfg.generation, cfg.model, cfg.paths.cache_dir)
    local = label_comparisons(local_engine, prompts, COMPARISONS, plain, cfg.seed)
    record = {
        "command": "python scripts/record_llama_server.py",
        "server": f"llama-cpp-python {server_version()} (llama_cpp.server, "
        "--logits_all true, --seed 0)",
        "model": gguf.name,
        "recorded": time.strftime("%Y-%m-%d"),
        "served_wall_s": round(served_s, 1),
        "comparisons": [
            {"id": c.id, "prompt": c.prompt, "answers": list(c.answers), "kind": c.kind}
            for c in COMPARISONS
        ],
        "labels_served": [r["p_a"] for r in served],
        "labels_served_cot": [r["p_a"] for r in served_cot],
        "cot_reasoning": [q.get("reasoning") for q in served_cot[0]["queries"]],
        "labels_in_process": [r["p_a"] for r in local],
        "exchanges": [x for x in transcript],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(OUT, "wt") as f:
        json.dump(record, f)
    difference = [
        abs(a - b)
        for a, b in zip(record["labels_served"], record["labels_in_process"], strict=True)
    ]
    print(json.dumps({k: v for k, v in record.items() if k != "exchanges"}, indent=1))
    print(f"{len(transcript)} exchanges -> {OUT} ({OUT.stat().st_size / 1e3:.0f} kB)")
    print(f"|p served - p in-process|: max {max(difference):.4f}, mean "
          f"{sum(difference) / len(difference):.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
