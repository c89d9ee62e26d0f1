"""The HTTP labeller against a real llama.cpp server (llama-cpp-python's OpenAI-compatible
server) serving the embedded SmolLM2-135M GGUF file. Slow (a server start and ~2k-token
prompts); needs the `server` extra (`pip install -e ".[server]"`) or CAI_LLAMA_PYTHON naming a
Python that has it:

    CAI_LLAMA_PYTHON=/path/to/venv/bin/python pytest -m slow tests/test_llama_server.py -s
"""

from __future__ import annotations

import pytest
from conftest import TINY_STAGES

from cai.errors import EndpointError
from cai.generation import Endpoint, HTTPEngine, ScoreRequest
from cai.generation.llama_server import llama_server, llama_server_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not llama_server_available(),
        reason='needs llama-cpp-python[server]: pip install -e ".[server]" or CAI_LLAMA_PYTHON',
    ),
]

STAGES = "pipeline.stages=[generate_sl,sft,generate_pairs,feedback]"
FEW = ["data.max_red_team=3", "data.max_helpful=1"]  # each served request is a ~2k-token prompt


@pytest.fixture(scope="module")
def gguf():
    from cai.config import compose
    from cai.models import locate_gguf

    return locate_gguf(compose([]).model)


def test_feedback_labels_from_the_served_model_agree_with_the_same_model_in_process(
    make_cfg, gguf, tmp_path
):
    """A tiny policy's pairs labelled by SmolLM2-135M served by llama.cpp, and by the same model
    loaded in this process (feedback.model=smollm2_135m)."""
    from cai.artifacts import read_jsonl
    from cai.pipeline import run

    with llama_server(gguf, log_file=tmp_path / "server.log") as url:
        served = run(make_cfg(*TINY_STAGES, *FEW, STAGES, "feedback.model=http",
                              f"feedback.endpoint.url={url}", "feedback.endpoint.concurrency=2"))  # fmt: skip
    local = run(make_cfg(*TINY_STAGES, *FEW, STAGES, "feedback.model=smollm2_135m"))
    p_served = [r["p_a"] for r in read_jsonl(served["feedback"].file("labels.jsonl"))]
    p_local = [r["p_a"] for r in read_jsonl(local["feedback"].file("labels.jsonl"))]
    assert len(p_served) == len(p_local) > 0
    difference = [abs(a - b) for a, b in zip(p_served, p_local, strict=True)]
    print(f"\n{len(difference)} labels: |p served - p in-process| max {max(difference):.4f}, "
          f"mean {sum(difference) / len(difference):.4f}")  # fmt: skip
    assert sum(difference) / len(difference) < 0.03 and max(difference) < 0.1
    assert served["feedback"].manifest["metrics"]["engine"]["requests"] == 4 * len(p_served)


def test_a_llama_server_without_prompt_logprobs_is_one_clear_error(gguf, tmp_path):
    with llama_server(gguf, logits_all=False, log_file=tmp_path / "server.log") as url:
        engine = HTTPEngine(Endpoint(url=url, backoff_s=0), progress=False)
        with pytest.raises(EndpointError, match=r"--logits_all true.*logits_all=False"):
            engine.score([ScoreRequest("The answer is:", (" (A)", " (B)"))])
        assert engine.stats["retries"] == 0  # not retried: it cannot work
