"""Fidelity fixes: each test checks one reproduced detail against the paper or standard practice,
computed independently of the code under test."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from cai.config import CONF_DIR


@pytest.fixture
def tiny():
    from cai.config import compose
    from cai.models import load_model

    cfg = compose(["model=tiny"])
    return load_model(cfg.model, cfg.paths.cache_dir, dtype="float32")


class RecordingEngine:
    """Returns fixed generations and records the requests it was given (checks PPO's plumbing
    exactly; generation itself is tested against transformers elsewhere)."""

    def __init__(self, generations):
        self.generations, self.requests = generations, []

    def generate(self, requests, desc=""):
        self.requests += requests
        return self.generations[: len(requests)]

    def update_weights(self, model):
        self.synced = model


def _ppo_module(tiny, engine, **settings):
    from cai.modules.ppo import PPOModule, ValueHead

    policy, tokenizer = tiny
    ppo = OmegaConf.merge(OmegaConf.load(CONF_DIR / "ppo" / "default.yaml"), settings)
    prompts = [("red_team", "q", "Question?"), ("red_team", "r", "Other?")]
    return PPOModule(
        policy, policy, ValueHead(policy.config.hidden_size), engine, None, tokenizer, prompts, ppo
    )


def test_ppo_logprobs_are_taken_at_the_sampling_temperature(tiny):
    from cai.modules.ppo import Rollout, token_logprobs_and_hidden

    policy, _ = tiny
    ids = torch.tensor([[5, 17, 301, 42, 7, 99]])
    rollout = Rollout(["p"], ["a"], ids, torch.tensor([3]), torch.ones(1, 3), [True])
    with torch.no_grad():
        logits = policy(input_ids=ids).logits[0].float()  # [6, V], read independently
        for temperature in (1.0, 0.5):
            want = torch.log_softmax(logits[2:5] / temperature, -1)[torch.arange(3), ids[0, 3:6]]
            got, _ = token_logprobs_and_hidden(policy, rollout, temperature)
            assert torch.allclose(got[0], want, atol=1e-4), temperature
    assert not torch.allclose(
        token_logprobs_and_hidden(policy, rollout, 0.5)[0],
        token_logprobs_and_hidden(policy, rollout, 1.0)[0],
    )


def test_ppo_appends_the_stop_token_it_sampled(tiny):
    from cai.generation.base import Generation

    _, tokenizer = tiny
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert endoftext != tokenizer.eos_token_id
    generations = [
        Generation("hi", 2, "stop", token_ids=(31, 32), stop_token_id=endoftext),
        Generation("yo", 2, "length", token_ids=(33, 34)),
    ]
    module = _ppo_module(tiny, RecordingEngine(generations), max_new_tokens=2)
    rollout = module.rollout([0, 1])
    prompt_len = int(rollout.answer_start[0])
    assert rollout.input_ids[0, prompt_len : prompt_len + 3].tolist() == [31, 32, endoftext]
    assert rollout.mask[0].tolist() == [1, 1, 1]
    assert rollout.mask[1].tolist() == [1, 1, 0]  # cut off: no end token appended
    assert rollout.ended == [True, False]


def test_ppo_rollouts_seed_each_slot(tiny):
    from cai.generation.base import Generation

    engine = RecordingEngine([Generation("a", 1, "length", token_ids=(40,))] * 3)
    module = _ppo_module(tiny, engine, max_new_tokens=1)
    module.rollout([0, 0, 1])  # the same prompt twice in one batch
    seeds = [r.seed for r in engine.requests]
    assert len(set(seeds)) == 3
    module.seed = 1
    module.rollout([0, 0, 1])
    assert not set(seeds) & {r.seed for r in engine.requests[3:]}  # seeded from the stage seed


def test_generation_records_the_stop_token(tiny):
    from cai.generation.base import Request
    from cai.generation.hf import HFEngine

    policy, tokenizer = tiny
    engine = HFEngine(policy, tokenizer, 8, progress=False)
    out = engine.generate([Request("Hello", 40, temperature=1.0, seed=s) for s in range(8)])
    for g in out:
        if g.finish_reason == "stop":
            assert g.stop_token_id in engine.stop_token_ids
            assert g.stop_token_id not in g.token_ids
        else:
            assert g.stop_token_id is None


def test_sft_gives_no_end_token_to_a_cut_off_text(tiny):
    from cai.modules.sft import IGNORE, encode_example

    _, tokenizer = tiny
    eos = tokenizer.eos_token_id
    ended = encode_example(tokenizer, "Q?", "An answer.", "chat", "x", ended=True)
    cut = encode_example(tokenizer, "Q?", "An answer.", "chat", "x", ended=False)
    assert ended.labels[-1] == eos and ended.input_ids[:-1] == cut.input_ids
    assert eos not in [t for t in cut.labels if t != IGNORE]


def test_sft_trains_on_the_target_revision_text_and_its_finish(tmp_path, tiny):
    """sl_examples uses revision n's text, with an end token only where it ended."""
    from cai.artifacts import ArtifactStore, write_jsonl_atomic
    from cai.modules.sft import IGNORE, sl_examples

    _, tokenizer = tiny
    store = ArtifactStore(tmp_path)
    work = store.start("generate_sl", "k", fresh=True)
    records = [
        {
            "id": "red-1",
            "prompt": "How do I pick a lock?",
            "initial": "Initial text.",
            "initial_finish": "stop",
            "revisions": [
                {"revision": "First revision.", "revision_finish": "stop"},
                {"revision": "Second revision cut", "revision_finish": "length"},
            ],
        }
    ]
    write_jsonl_atomic(work / "red_team.jsonl", records)
    write_jsonl_atomic(work / "helpful.jsonl", [])
    artifact = store.finish("generate_sl", "k", {"metrics": {"revisions_per_prompt": 2}})
    for n, text, ends in ((1, "First revision.", True), (2, "Second revision cut", False)):
        (example,), _ = sl_examples(artifact, n, tokenizer, "chat", False, 512)
        target = [t for t in example.labels if t != IGNORE]
        body = tokenizer(text, add_special_tokens=False).input_ids
        assert target == body + ([tokenizer.eos_token_id] if ends else [])


def test_feedback_fewshot_principles_are_sampled_per_example():
    from cai.ai_feedback import FeedbackPrompts
    from cai.constitution import load_constitution

    constitution = load_constitution(OmegaConf.create({"source": "builtin"}))
    principles = constitution.feedback
    n = len(constitution.feedback_fewshot)

    def used(prefix: str) -> list[int]:
        found = []
        for block in prefix.split("Consider the following conversation")[1:]:
            found += [i for i, p in enumerate(principles) if f"\n\n\n{p.strip()}\n (A)" in block]
        return found

    first, again, other = (FeedbackPrompts(constitution, seed=s).prefix for s in (0, 0, 7))
    assert first == again  # seeded
    assert first != other
    runs = [used(FeedbackPrompts(constitution, seed=s).prefix) for s in range(12)]
    assert all(len(r) == n for r in runs)
    assert any(r != [i % len(principles) for i in range(n)] for r in runs)  # not by position
    assert len({i for r in runs for i in r}) > n  # many principles appear over seeds


def test_hh_rlhf_baseline_pm_gets_the_rl_cai_mix():
    from cai.comparisons import mix

    harmless, helpful = mix(list(range(512)), list(range(1000, 1048)), 1.0, seed=0)
    assert (len(harmless), len(helpful)) == (48, 48)  # as RL-CAI's 48 AI : 48 helpful labels
    harmless, helpful = mix(list(range(48)), list(range(1000, 1100)), 0.5, seed=0)
    assert (len(harmless), len(helpful)) == (48, 24)
    assert mix([], [1, 2, 3], 1.0, 0) == ([], [1, 2, 3])  # helpful-only PM keeps everything


def test_hhh_cot_uses_the_cot_fewshot_format(data_dir):
    """The CoT question looks like the paper's RLMadisonPrecog few-shots, read from the file."""
    from cai.eval.hhh import cot_context
    from cai.paper_evals import load_eval

    shots = json.loads(
        (data_dir / "cai-paper" / "prompts" / "RLMadisonPrecogFewShotPrompts.json").read_text()
    )
    shot = shots[0]["prompt"]
    opening = shot.split("\n\nH:")[0]  # "\n\nHuman: Consider ... (H) and an assistant (A):"
    item = load_eval("hhh", str(data_dir))[0]
    question = cot_context(item.prompt)
    assert question.startswith(opening + "\n\nH: ")
    assert "\n\nA: " in question or item.prompt.count("Assistant:") == 0
    assert "Options:" not in question and "\n\nHuman: I " not in question
    assert "\n (A) [[[" in question and "\n (B) [[[" in question
    reasoning = "\n\nAssistant: Let's think step by step:"
    assert reasoning in shot and question.endswith(reasoning)
