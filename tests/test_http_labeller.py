"""The HTTP labeller (feedback.model=http, eval.ai_feedback.model=http): an OpenAI-compatible
completions endpoint scored through prompt log-probabilities.

- on replies recorded from llama.cpp's server (the embedded SmolLM2-135M, replayed over a
  loopback server): the client's labels are the recorded ones, each option's score is the sum
  of the option's own tokens in the reply, and the served labels are close to the in-process
  ones of the same model;
- against a loopback server backed by the real tiny model: the feedback stage gives the labels
  of the in-process engine; faults (HTTP 503, timeouts, refusals, no log-probabilities, no
  URL, no API key) are one clear error naming the setting, and finished chunks are kept.
The real llama.cpp server: tests/test_llama_server.py (slow).
"""

from __future__ import annotations

import pytest
from conftest import TINY_STAGES
from served import ModelServer, ReplayServer, canonical, load_recording

from cai.ai_feedback import FeedbackPrompts, LabelSettings, label_comparisons
from cai.comparisons import Comparison
from cai.errors import ConfigError, EndpointError
from cai.generation import Endpoint, HTTPEngine, ScoreRequest

STAGES = "pipeline.stages=[generate_sl,sft,generate_pairs,feedback]"


# ---------------------------------------------------------------------------------------------
# Replies recorded from llama.cpp's server


@pytest.fixture(scope="module")
def recording():
    return load_recording()


def recorded_comparisons(recording):
    return [
        Comparison.of_answers(c["id"], c["prompt"], tuple(c["answers"]), c["kind"])
        for c in recording["comparisons"]
    ]


def test_replayed_llama_server_replies_give_the_recorded_labels(recording, make_cfg):
    from cai.inputs import load_inputs

    cfg = make_cfg()
    constitution, _ = load_inputs(cfg)
    prompts = FeedbackPrompts(constitution, cfg.feedback.helpfulness_principle, seed=cfg.seed)
    comparisons = recorded_comparisons(recording)
    with ReplayServer(recording) as server:
        engine = HTTPEngine(Endpoint(url=server.url, retries=0), progress=False)
        plain = label_comparisons(engine, prompts, comparisons, LabelSettings(swap=True), 0)
        cot_settings = LabelSettings(cot=True, cot_max_tokens=24)
        cot = label_comparisons(engine, prompts, comparisons[:1], cot_settings, 0)
    # every request the client sent was one the recorder sent (else the replay says 404)
    assert [r["p_a"] for r in plain] == pytest.approx(recording["labels_served"], abs=1e-12)
    assert [r["p_a"] for r in cot] == pytest.approx(recording["labels_served_cot"], abs=1e-12)
    # generated text comes back stripped, as from the in-process engine
    assert cot[0]["queries"][0]["reasoning"] == recording["cot_reasoning"][0].strip()
    # the CoT label is clamped to [0.4, 0.6] (paper, section 4.1)
    assert 0.4 <= cot[0]["p_a"] <= 0.6
    # the served model labels as the same model in this process does, within the difference
    # recorded (Q4_1 weights in llama.cpp's own kernels vs the dequantised weights in torch)
    served, local = recording["labels_served"], recording["labels_in_process"]
    assert max(abs(a - b) for a, b in zip(served, local, strict=True)) < 0.05


def test_an_option_scores_the_sum_of_its_own_tokens_in_the_reply(recording):
    """Read independently of the client: walk the reply's tokens back from the end until they
    spell the option, and sum their log-probabilities."""
    exchange = next(x for x in recording["exchanges"] if x["request"].get("echo"))
    prompt = exchange["request"]["prompt"]
    option = next(o for o in (" (A)", " (B)") if prompt.endswith(o))
    logprobs = exchange["response"]["choices"][0]["logprobs"]
    in_prompt = [i for i, o in enumerate(logprobs["text_offset"]) if o < len(prompt)]
    tokens = [logprobs["tokens"][i] for i in in_prompt]  # a generated token, if any, left out
    values = [logprobs["token_logprobs"][i] for i in in_prompt]
    spelled, total, i = "", 0.0, len(tokens)
    while spelled != option:
        i -= 1
        spelled, total = tokens[i] + spelled, total + values[i]
        assert len(spelled) <= len(option), "the option's tokens do not spell it"
    with ReplayServer(recording) as server:
        engine = HTTPEngine(Endpoint(url=server.url, retries=0), progress=False)
        context = prompt[: -len(option)]
        (scores,) = engine.score([ScoreRequest(context, (option,))])
    assert scores.logprobs[0] == pytest.approx(total, abs=1e-9)
    assert scores.num_tokens[0] == len(tokens) - i


# ---------------------------------------------------------------------------------------------
# A loopback server backed by the real tiny model


@pytest.fixture
def tiny_server(make_cfg):
    from cai.models import load_model

    cfg = make_cfg("model=tiny")
    model, tokenizer = load_model(cfg.model, cfg.paths.cache_dir)
    with ModelServer(model, tokenizer) as server:
        yield server


def http_overrides(url: str, *extra: str) -> list[str]:
    return [*TINY_STAGES, STAGES, "feedback.model=http", f"feedback.endpoint.url={url}",
            "feedback.endpoint.backoff_s=0", *extra]  # fmt: skip


def test_feedback_stage_over_http_gives_the_in_process_labels(make_cfg, tiny_server):
    from cai.artifacts import read_jsonl
    from cai.pipeline import artifact_key, run

    served = run(make_cfg(*http_overrides(tiny_server.url)))["feedback"]
    local = run(make_cfg(*TINY_STAGES, STAGES))["feedback"]
    p_served = [r["p_a"] for r in read_jsonl(served.file("labels.jsonl"))]
    p_local = [r["p_a"] for r in read_jsonl(local.file("labels.jsonl"))]
    assert len(p_served) == len(p_local) > 0
    assert p_served == pytest.approx(p_local, abs=1e-3)
    assert served.manifest["metrics"]["engine"]["requests"] == 4 * len(p_served)  # 2 orders x 2
    # how the server is called is not part of the key; where it is, is
    base = make_cfg(*http_overrides(tiny_server.url))
    assert artifact_key(base, "feedback") == artifact_key(
        make_cfg(*http_overrides(tiny_server.url, "feedback.endpoint.concurrency=1",
                                 "feedback.endpoint.timeout_s=5")), "feedback")  # fmt: skip
    assert artifact_key(base, "feedback") != artifact_key(
        make_cfg(*http_overrides(tiny_server.url + "/other")), "feedback"
    )
    # and an endpoint that is not used changes no key
    assert artifact_key(make_cfg(*TINY_STAGES, STAGES), "feedback") == artifact_key(
        make_cfg(*TINY_STAGES, STAGES, "feedback.endpoint.url=http://elsewhere:1/v1"), "feedback"
    )


def test_a_server_failing_mid_run_keeps_the_finished_chunks(make_cfg, tiny_server):
    from cai.artifacts import read_jsonl
    from cai.pipeline import run

    overrides = http_overrides(tiny_server.url, "feedback.chunk_size=2",
                               "feedback.endpoint.retries=1", "feedback.endpoint.concurrency=1")  # fmt: skip
    tiny_server.fail_after = 8  # one chunk: 2 comparisons x 2 orders x 2 options
    with pytest.raises(EndpointError, match=r"feedback.endpoint.url=.*no answer after 2 tries"):
        run(make_cfg(*overrides))
    partial = next(_partials(make_cfg(*overrides)))
    assert sorted(p.name for p in (partial / "parts").iterdir()) == ["part-000000.jsonl"]
    tiny_server.fail_after = None
    resumed = run(make_cfg(*overrides))["feedback"]
    assert resumed.manifest["metrics"]["resumed_chunks"] == 1
    whole = run(make_cfg(*overrides, "feedback.chunk_size=3"))["feedback"]
    assert [r["p_a"] for r in read_jsonl(resumed.file("labels.jsonl"))] == pytest.approx(
        [r["p_a"] for r in read_jsonl(whole.file("labels.jsonl"))], abs=1e-9
    )


def _partials(cfg):
    from pathlib import Path

    yield from Path(cfg.paths.output_dir, "artifacts", "feedback").glob("*.partial")


def one_request(url: str, **endpoint) -> None:
    engine = HTTPEngine(Endpoint(url=url, backoff_s=0, **endpoint), progress=False)
    engine.score([ScoreRequest("The answer is:", (" (A)", " (B)"))])


def test_a_server_without_log_probabilities_is_named(tiny_server):
    tiny_server.logprobs = False
    with pytest.raises(EndpointError, match=r"feedback.endpoint.url=.*no prompt log-probabilities"):
        one_request(tiny_server.url)


def test_a_refusal_is_not_retried_and_says_what_the_server_said(tiny_server):
    tiny_server.fail_after, tiny_server.fail_status = 0, 400
    with pytest.raises(EndpointError, match=r"refused the request \(HTTP 400: .*overloaded"):
        one_request(tiny_server.url, retries=3, concurrency=1)
    sent = [canonical(r) for r in tiny_server.requests]
    assert len(sent) == len(set(sent)) <= 2  # no request was sent twice


def test_timeouts_and_overload_are_retried_then_named(tiny_server):
    tiny_server.delay_s = 1.0
    with pytest.raises(EndpointError, match=r"no answer after 2 tries \(timed out after 0.2 s\)"):
        one_request(tiny_server.url, timeout_s=0.2, retries=1)
    tiny_server.delay_s, tiny_server.fail_after = 0.0, 1  # first request fine, then 503
    with pytest.raises(EndpointError, match=r"no answer after 3 tries \(HTTP 503"):
        one_request(tiny_server.url, retries=2, concurrency=1)


def test_an_unreachable_server_is_named(tiny_server):
    closed = tiny_server.url.rsplit(":", 1)[0] + ":9/v1"  # the discard port: nothing listens
    with pytest.raises(EndpointError, match=r"127.0.0.1:9/v1: no answer after 1 tries"):
        one_request(closed, retries=0)


def test_the_api_key_is_sent_from_its_environment_variable(tiny_server, monkeypatch):
    with pytest.raises(EndpointError, match="api_key_env=CAI_TEST_KEY: that environment"):
        one_request(tiny_server.url, api_key_env="CAI_TEST_KEY")
    monkeypatch.setenv("CAI_TEST_KEY", "sk-test")
    one_request(tiny_server.url, api_key_env="CAI_TEST_KEY")
    assert tiny_server.headers[-1]["Authorization"] == "Bearer sk-test"


def test_http_without_a_url_fails_before_any_work(make_cfg):
    from cai.pipeline import run

    with pytest.raises(ConfigError, match=r"feedback.model=http needs feedback.endpoint.url"):
        run(make_cfg(*TINY_STAGES, STAGES, "feedback.model=http"))
    with pytest.raises(ConfigError, match=r"eval.ai_feedback.model=http needs eval.ai_feedback"):
        run(make_cfg(*TINY_STAGES, "eval.ai_feedback.model=http", "pipeline.plan=true"))


def test_a_served_judge_is_the_same_model_only_on_the_same_server(make_cfg):
    from cai.eval.compare import ai_judge_independence

    def same_model(judge_url: str) -> bool:
        cfg = make_cfg("model=tiny", "feedback.model=http", "eval.ai_feedback.model=http",
                       "feedback.endpoint.url=http://a:8000/v1",
                       f"eval.ai_feedback.endpoint.url={judge_url}")  # fmt: skip
        return ai_judge_independence(cfg, {})["same_model_as_feedback"]

    assert same_model("http://a:8000/v1")
    assert not same_model("http://b:8000/v1")


def test_sl_data_from_a_served_model_match_the_in_process_model_greedy(make_cfg, tiny_server):
    """sl.model=http: the served model answers, critiques and revises; greedy, the same tiny
    model gives the same SL data over HTTP as in process."""
    from cai.artifacts import read_jsonl
    from cai.pipeline import artifact_key, run

    sl = [*TINY_STAGES, "pipeline.stages=[generate_sl]", "sl.temperature=0"]
    served_cfg = make_cfg(*sl, "sl.model=http", f"sl.endpoint.url={tiny_server.url}")
    served = run(served_cfg)["generate_sl"]
    local = run(make_cfg(*sl))["generate_sl"]
    assert artifact_key(served_cfg, "generate_sl") != artifact_key(make_cfg(*sl), "generate_sl")
    for name in ("red_team.jsonl", "helpful.jsonl"):
        a, b = read_jsonl(served.file(name)), read_jsonl(local.file(name))
        assert len(a) == len(b) > 0
        assert [r.get("initial", r.get("answer")) for r in a] == [
            r.get("initial", r.get("answer")) for r in b
        ]
    red = read_jsonl(served.file("red_team.jsonl"))
    assert [x["revision"] for r in red for x in r["revisions"]] == [
        x["revision"] for r in read_jsonl(local.file("red_team.jsonl")) for x in r["revisions"]
    ]
    # answer + critique + revision per red-team prompt, the helpfulness samples
    assert served.manifest["metrics"]["engine"]["requests"] == 3 * len(red) + sum(
        len(r.get("samples", [1])) for r in read_jsonl(served.file("helpful.jsonl"))
    )


def test_a_served_sl_model_without_a_url_fails_before_any_work(make_cfg):
    from cai.pipeline import run

    with pytest.raises(ConfigError, match=r"sl.model=http needs sl.endpoint.url"):
        run(make_cfg(*TINY_STAGES, "pipeline.stages=[generate_sl]", "sl.model=http"))
    with pytest.raises(ConfigError, match=r"sl.model='gpt'"):
        run(make_cfg(*TINY_STAGES, "pipeline.stages=[generate_sl]", "sl.model=gpt"))
