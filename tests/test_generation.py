"""The hf engine against transformers' own `generate`, stop strings, seeded sampling."""

import pytest
import torch

from cai.config import load_model_preset
from cai.generation.base import Request
from cai.generation.hf import HFEngine
from cai.models import load_model

PREFIX = (
    "\n\nHuman: What is two plus two?\n\nAssistant: Four.\n\nHuman: Name a colour.\n\nAssistant: Blue."
    * 5
)
PROMPTS = [
    "\n\nHuman: How do I bake bread?\n\nAssistant:",
    "\n\nHuman: Hi\n\nAssistant:",
    "\n\nHuman: Tell me about cats and their habits at night, please.\n\nAssistant:",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from cai.config import compose

    cache = compose([]).paths.cache_dir
    return load_model(load_model_preset("tiny"), cache)


def reference(model, tokenizer, text, max_new_tokens):
    ids = tokenizer(text, return_tensors="pt")
    out = model.generate(
        **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return out[0, ids.input_ids.shape[1] :].tolist()


@pytest.mark.parametrize("prefix", ["", PREFIX])
def test_greedy_matches_transformers_generate(tiny, prefix):
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer, batch_size=2, progress=False)
    out = engine.generate(
        [Request(p, max_new_tokens=12, temperature=0) for p in PROMPTS], prefix=prefix
    )
    for prompt, generation in zip(PROMPTS, out, strict=True):
        expected = reference(model, tokenizer, prefix + prompt, 12)
        assert generation.text == tokenizer.decode(expected, skip_special_tokens=True).strip()
        assert generation.num_tokens == 12 and generation.finish_reason == "length"


def test_prefix_cache_changes_nothing_but_speed(tiny):
    model, tokenizer = tiny
    requests = [
        Request(p, max_new_tokens=10, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS)
    ]
    cached = HFEngine(model, tokenizer, progress=False).generate(requests, prefix=PREFIX)
    plain = HFEngine(model, tokenizer, prefix_cache=False, progress=False).generate(
        requests, prefix=PREFIX
    )
    assert [g.text for g in cached] == [g.text for g in plain]


def test_sampling_is_seeded_per_request(tiny):
    model, tokenizer = tiny
    requests = [
        Request(p, max_new_tokens=10, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS)
    ]
    batched = HFEngine(model, tokenizer, batch_size=3, progress=False).generate(
        requests, prefix=PREFIX
    )
    single = HFEngine(model, tokenizer, batch_size=1, progress=False).generate(
        requests, prefix=PREFIX
    )
    assert [g.text for g in batched] == [g.text for g in single]
    reseeded = [
        Request(r.prompt, r.max_new_tokens, r.temperature, seed=r.seed + 100) for r in requests
    ]
    other = HFEngine(model, tokenizer, progress=False).generate(reseeded, prefix=PREFIX)
    assert [g.text for g in other] != [g.text for g in batched]


def test_stop_string_cuts_the_text(tiny):
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer, progress=False)
    free = engine.generate([Request(PROMPTS[0], max_new_tokens=20, temperature=0)])[0]
    tokens = tokenizer(free.text, add_special_tokens=False).input_ids
    stop = tokenizer.decode(tokens[3:5])  # a piece the model will produce
    assert stop.strip()
    cut = engine.generate([Request(PROMPTS[0], max_new_tokens=20, temperature=0, stop=(stop,))])[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert free.text.startswith(cut.text) and cut.num_tokens < 20


def test_end_token_finishes_a_row(tiny):
    model, tokenizer = tiny
    eos = torch.tensor([tokenizer.eos_token_id])
    hook = model.lm_head.register_forward_hook(
        lambda module, args, out: out.index_fill(-1, eos, 1e4)
    )
    try:  # the end token is always the most likely next token
        out = HFEngine(model, tokenizer, progress=False).generate(
            [Request(PROMPTS[1], max_new_tokens=8, temperature=0)]
        )
    finally:
        hook.remove()
    assert out[0].finish_reason == "stop" and out[0].num_tokens == 0 and out[0].text == ""


def test_continuing_from_a_state_changes_nothing_but_work(tiny):
    """A follow-up prompt that repeats an earlier prompt and its output reuses its state."""
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer, batch_size=2, progress=False)
    first = engine.generate(
        [Request(p, max_new_tokens=6, temperature=0) for p in PROMPTS],
        prefix=PREFIX,
        keep_state=True,
    )
    follow = [
        Request(
            p + g.text + "\n\nHuman: And then?\n\nAssistant:",
            max_new_tokens=8,
            temperature=1.0,
            seed=i,
        )
        for i, (p, g) in enumerate(zip(PROMPTS, first, strict=True))
    ]
    continued = engine.generate(follow, prefix=PREFIX, states=[g.extra["state"] for g in first])
    assert engine.stats["reused_tokens"] > 0
    fresh = HFEngine(model, tokenizer, batch_size=3, progress=False).generate(follow, prefix=PREFIX)
    assert [g.text for g in continued] == [g.text for g in fresh]


def test_backends_fail_clearly(make_cfg):
    from cai.errors import ConfigError
    from cai.generation import build_engine

    cfg = make_cfg("model=tiny", "generation=vllm")
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"pip install -e \\?\"\.\[vllm\]"):
            build_engine(cfg.generation, cfg.model, cfg.paths.cache_dir)
    cfg.generation.backend = "tgi"
    with pytest.raises(ConfigError, match="use hf or vllm"):
        build_engine(cfg.generation, cfg.model, cfg.paths.cache_dir)


def reference_logprob(model, tokenizer, context: str, option: str) -> float:
    """Sum of log p(option tokens | context) from one plain forward pass over context + option."""
    context_ids = tokenizer(context).input_ids
    full = tokenizer(context + option).input_ids
    assert full[: len(context_ids)] == context_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
    return sum(float(logprobs[t - 1, full[t]]) for t in range(len(context_ids), len(full)))


@pytest.mark.parametrize("prefix", ["", PREFIX])
def test_score_matches_a_plain_forward_pass(tiny, prefix):
    from cai.generation.base import ScoreRequest

    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer, batch_size=2, progress=False)
    requests = [
        ScoreRequest(p + " The answer is:", (" (A)", " (B)", " a much longer option text"))
        for p in PROMPTS
    ]
    scores = engine.score(requests, prefix=prefix)
    for request, result in zip(requests, scores, strict=True):
        for option, logprob, n in zip(
            request.options, result.logprobs, result.num_tokens, strict=True
        ):
            expected = reference_logprob(model, tokenizer, prefix + request.context, option)
            assert logprob == pytest.approx(expected, abs=1e-3)
            assert n == len(tokenizer(option, add_special_tokens=False).input_ids)
    assert scores[0].num_tokens[2] > 1  # a multi-token option sums all its tokens


def test_decode_attention_is_attention_over_prefix_and_row():
    """A decode step on the CPU path (one query per row, the cache's whole buffer with zeros
    past the filled columns) against the textbook formula: softmax over the shared prefix's
    keys followed by the row's own real keys."""
    from cai.generation.shared_prefix import PrefixCache, _cpu_decode_attention

    gen = torch.Generator().manual_seed(0)
    batch, kv_heads, groups, dim, prefix_len, filled, capacity = 3, 2, 3, 8, 5, 4, 7
    query = torch.randn(batch, kv_heads, groups, dim, generator=gen)
    key = torch.zeros(batch, kv_heads, capacity, dim)
    value = torch.zeros(batch, kv_heads, capacity, dim)
    key[:, :, :filled] = torch.randn(batch, kv_heads, filled, dim, generator=gen)
    value[:, :, :filled] = torch.randn(batch, kv_heads, filled, dim, generator=gen)
    prefix_k = torch.randn(1, kv_heads, prefix_len, dim, generator=gen)
    prefix_v = torch.randn(1, kv_heads, prefix_len, dim, generator=gen)
    key_mask = torch.ones(batch, filled, dtype=torch.bool)
    key_mask[1, :2] = False  # row 1 is left-padded by two columns
    prefix = PrefixCache([prefix_k], [prefix_v], prefix_len)
    for with_prefix in (prefix, None):
        out = _cpu_decode_attention(query, key, value, key_mask, with_prefix, 0, 0.5)
        assert out.shape == (batch, kv_heads, groups, dim)
        for b in range(batch):
            real = torch.cat([key_mask[b], torch.zeros(capacity - filled, dtype=torch.bool)])
            for h in range(kv_heads):
                keys, values = key[b, h][real], value[b, h][real]
                if with_prefix is not None:
                    keys = torch.cat([prefix_k[0, h], keys])
                    values = torch.cat([prefix_v[0, h], values])
                expected = torch.softmax(query[b, h] @ keys.T * 0.5, dim=-1) @ values
                torch.testing.assert_close(out[b, h], expected, rtol=1e-5, atol=1e-5)


def test_prefill_attention_is_attention_over_prefix_and_visible_keys():
    """Many queries per row on the CPU path against the textbook formula: each query attends to
    the whole shared prefix and to the suffix keys its mask lets it see."""
    from cai.generation.shared_prefix import PrefixCache, _cpu_prefill_attention

    gen = torch.Generator().manual_seed(1)
    batch, kv_heads, rows, dim, prefix_len, suffix_len = 2, 3, 4, 8, 6, 4
    query = torch.randn(batch, kv_heads, rows, dim, generator=gen)
    key = torch.randn(batch, kv_heads, suffix_len, dim, generator=gen)
    value = torch.randn(batch, kv_heads, suffix_len, dim, generator=gen)
    prefix_k = torch.randn(1, kv_heads, prefix_len, dim, generator=gen)
    prefix_v = torch.randn(1, kv_heads, prefix_len, dim, generator=gen)
    visible = torch.ones(suffix_len, suffix_len, dtype=torch.bool).tril()  # causal
    visible = visible[None].repeat(batch, 1, 1)
    visible[1, :, 0] = False  # row 1: its first column is padding
    visible[1, 0, 0] = True  # (a query always sees itself)
    mask = torch.zeros(batch, 1, rows, suffix_len).masked_fill(~visible[:, None], float("-inf"))
    prefix = PrefixCache([prefix_k], [prefix_v], prefix_len)
    for with_prefix in (prefix, None):
        out = _cpu_prefill_attention(query, key, value, mask, with_prefix, layer=0, scaling=0.3)
        for b in range(batch):
            for h in range(kv_heads):
                for r in range(rows):
                    seen = visible[b, r]
                    keys, values = key[b, h][seen], value[b, h][seen]
                    if with_prefix is not None:
                        keys = torch.cat([prefix_k[0, h], keys])
                        values = torch.cat([prefix_v[0, h], values])
                    weights = torch.softmax(query[b, h, r] @ keys.T * 0.3, dim=-1)
                    torch.testing.assert_close(out[b, h, r], weights @ values, rtol=1e-5, atol=1e-5)
