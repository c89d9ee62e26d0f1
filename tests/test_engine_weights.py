"""PPO's rollouts through `build_engine`: the hf engine shares the policy or takes its weights;
the vLLM engine reports the sampled tokens without the end token, as the hf engine does."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from cai.generation.base import Request


def _tiny():
    from cai.config import compose
    from cai.models import load_model

    cfg = compose(["model=tiny"])
    model, tokenizer = load_model(cfg.model, cfg.paths.cache_dir, dtype="float32")
    return cfg, model, tokenizer


def test_build_engine_generates_with_the_model_it_is_given():
    from cai.generation import build_engine

    cfg, policy, _ = _tiny()
    engine = build_engine(cfg.generation, cfg.model, cfg.paths.cache_dir, model=policy)
    assert engine.model is policy
    engine.update_weights(policy)  # shared weights: nothing to copy


def test_hf_engine_takes_new_weights():
    from cai.generation.hf import HFEngine

    cfg, policy, tokenizer = _tiny()
    _, other, _ = _tiny()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # the "trained" policy differs from the engine's
    engine = HFEngine(other.to(torch.bfloat16), tokenizer, batch_size=4, progress=False)
    request = [Request("Hello there, how are you?", max_new_tokens=6, temperature=0.0)]
    engine.update_weights(policy)
    for name, tensor in policy.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], tensor.to(torch.bfloat16)), name
    reference = HFEngine(policy.to(torch.bfloat16), tokenizer, batch_size=4, progress=False)
    assert engine.generate(request)[0].token_ids == reference.generate(request)[0].token_ids


def test_vllm_sampled_tokens_leave_out_the_end_token():
    from cai.generation.vllm import _sampled_tokens

    ended = SimpleNamespace(token_ids=[5, 6, 2], finish_reason="stop", stop_reason=None)
    assert _sampled_tokens(ended) == (5, 6)  # stopped on the end token 2
    cut = SimpleNamespace(token_ids=[5, 6, 7], finish_reason="length", stop_reason=None)
    assert _sampled_tokens(cut) == (5, 6, 7)
    on_id = SimpleNamespace(token_ids=[5, 9], finish_reason="stop", stop_reason=9)
    assert _sampled_tokens(on_id) == (5,)
