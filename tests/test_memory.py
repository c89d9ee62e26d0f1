"""Memory: chunked LM-head log-probabilities, micro-batches, bf16 weights with fp32 masters, the
attention kernel training uses on a CPU, and the per-stage memory report."""

from __future__ import annotations

import copy

import pytest
import torch

from cai.memory import fork_available, in_child_process, rss_gb
from cai.modules.logprobs import token_logprobs
from cai.modules.training import MasterWeightAdamW, full_precision_state_dict, row_slices


@pytest.fixture(scope="module")
def tiny():
    from cai.config import compose
    from cai.models import load_model

    cfg = compose(["model=tiny"])
    return load_model(cfg.model, cfg.paths.cache_dir, dtype="float32")


def test_token_logprobs_match_the_full_log_softmax_in_value_and_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    upstream = torch.randn(37, dtype=torch.float64)
    for temperature in (1.0, 0.7):
        ours = token_logprobs(hidden, weight, targets, temperature, chunk=8)  # 5 chunks
        full = torch.log_softmax(hidden @ weight.T / temperature, -1)[torch.arange(37), targets]
        assert ours.shape == (37,)
        assert torch.allclose(ours.double(), full, atol=1e-5)
        got = torch.autograd.grad((ours * upstream).sum(), (hidden, weight))
        want = torch.autograd.grad((full * upstream).sum(), (hidden, weight))
        for g, w in zip(got, want, strict=True):
            assert torch.allclose(g.double(), w, atol=1e-5)


def test_token_logprobs_by_hand():
    # one position, vocabulary of 2: logits (2, 0) -> log p(0) = -log(1 + e^-2)
    hidden = torch.tensor([[1.0, 0.0]])
    weight = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    value = token_logprobs(hidden, weight, torch.tensor([0]))
    assert value.item() == pytest.approx(-torch.log1p(torch.exp(torch.tensor(-2.0))).item())
    halved = token_logprobs(hidden, weight, torch.tensor([0]), temperature=2.0)  # logits (1, 0)
    assert halved.item() == pytest.approx(-torch.log1p(torch.exp(torch.tensor(-1.0))).item())


def test_row_slices_respect_the_token_budget():
    assert row_slices([10, 10, 10, 10], None) == [slice(0, 4)]
    # 2 rows x 10 = 20 <= 25; a third would make 30
    assert row_slices([10, 10, 10, 10], 25) == [slice(0, 2), slice(2, 4)]
    # the widest row sets the padded size: [5, 20] is 40 > 30
    assert row_slices([5, 20, 5], 30) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert row_slices([100, 3], 10) == [slice(0, 1), slice(1, 2)]  # a long row goes alone


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_sft_micro_batches_give_the_whole_batch_gradient(tiny):
    from cai.modules.sft import SFTModule, collate, encode_example, sft_micro_batches

    model, tokenizer = tiny
    examples = [
        encode_example(tokenizer, f"Question {i}?", "Sure. " * (1 + 3 * i), "chat", f"p{i}")
        for i in range(4)
    ]
    batch = collate(examples, tokenizer.pad_token_id)
    widths = [len(e.input_ids) for e in examples]
    parts = sft_micro_batches(batch, 2 * max(widths))
    assert len(parts) >= 2 and sum(len(p["input_ids"]) for p in parts) == 4
    grads = []
    for budget in (None, 2 * max(widths)):
        module = SFTModule(
            copy.deepcopy(model), 1e-3, 0.0, (0.9, 0.95), 1, micro_batch_tokens=budget
        )
        module.training_step(batch, 0).backward()
        grads.append(_grads(module.model))
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_pm_micro_batches_give_the_whole_batch_gradient(tiny):
    from cai.config import compose
    from cai.modules.pm import EncodedPair, PMModule, collate_pairs, init_preference_model

    cfg = compose(["model=tiny"])
    pm, tokenizer = init_preference_model(cfg.model, cfg.paths.cache_dir, seed=0)
    pairs = [
        EncodedPair(list(range(5, 12 + i)), list(range(20, 24 + 2 * i)), p)
        for i, p in enumerate((0.9, 0.2, 0.6))
    ]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    grads = []
    for budget in (None, 30):  # 30 tokens: one or two comparisons per micro-batch
        module = PMModule(copy.deepcopy(pm), 1e-3, 0.0, (0.9, 0.95), 1, micro_batch_tokens=budget)
        module.training_step(batch, 0).backward()
        grads.append(_grads(module.model))
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_master_weights_follow_fp32_adamw_and_survive_a_checkpoint():
    torch.manual_seed(0)
    start = torch.randn(64, 8)
    low = torch.nn.Parameter(start.to(torch.bfloat16))
    head = torch.nn.Parameter(torch.randn(8))  # fp32: updated in place
    reference = torch.nn.Parameter(start.to(torch.bfloat16).float())  # what the masters start at
    ours = MasterWeightAdamW([low, head], lr=1e-3)
    plain = torch.optim.AdamW([reference], lr=1e-3)
    for _ in range(3):
        grad = torch.randn(64, 8)
        low.grad, reference.grad, head.grad = (
            grad.to(torch.bfloat16),
            grad.to(torch.bfloat16).float(),
            torch.ones(8),
        )
        ours.step()
        plain.step()
    master = ours.full_precision()[id(low)]
    assert master.dtype == torch.float32
    assert torch.allclose(master, reference.detach(), rtol=1e-6, atol=1e-7)  # AdamW in fp32
    assert torch.equal(low.detach(), master.to(torch.bfloat16))  # rounded into the bf16 model
    assert ours.full_precision()[id(head)] is head
    # updates of 1e-3 x lr are lost in bf16 alone, kept in the masters
    assert not torch.equal(master.to(torch.bfloat16).float(), master)
    state = ours.state_dict()
    fresh = MasterWeightAdamW([torch.nn.Parameter(low.detach().clone()), head], lr=1e-3)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.full_precision()[id(fresh.model_params[0])], master)


def test_master_weights_updated_a_group_at_a_time_match_one_adamw(monkeypatch):
    """Groups of at most GROUP_ELEMENTS weights (one group's fp32 gradients alive at a time)
    give exactly the update of one fp32 AdamW over all the weights."""
    monkeypatch.setattr(MasterWeightAdamW, "GROUP_ELEMENTS", 600)
    torch.manual_seed(1)
    starts = [torch.randn(n) for n in (512, 64, 64, 700)]
    low = [torch.nn.Parameter(s.to(torch.bfloat16)) for s in starts]
    reference = [torch.nn.Parameter(s.to(torch.bfloat16).float()) for s in starts]
    ours = MasterWeightAdamW(low, lr=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.1)
    assert [len(g["params"]) for g in ours.param_groups] == [2, 1, 1]  # 512+64 | 64 | 700
    for _ in range(3):
        for a, b in zip(low, reference, strict=True):
            grad = torch.randn(a.shape)
            a.grad, b.grad = grad.to(torch.bfloat16), grad.to(torch.bfloat16).float()
        ours.step()
        plain.step()
        assert all(p.grad is None for p in low)  # the bf16 gradients went with the update
    masters = ours.full_precision()
    for a, b in zip(low, reference, strict=True):
        assert torch.allclose(masters[id(a)], b.detach(), rtol=1e-6, atol=1e-7)
    assert len(ours.param_groups) == 3  # restored after the group-by-group step


def test_full_precision_state_dict_keeps_tied_weights_tied(tiny):
    model, _ = tiny
    low = copy.deepcopy(model).to(torch.bfloat16)
    optimizer = MasterWeightAdamW(list(low.parameters()), lr=1e-3)
    state = full_precision_state_dict(low, optimizer)
    assert all(t.dtype == torch.float32 for t in state.values())
    if low.config.tie_word_embeddings:
        assert state["lm_head.weight"] is state["model.embed_tokens.weight"]


def test_training_stages_use_memory_efficient_attention_on_the_cpu(tiny):
    """The default config trains with SDPA (fused, memory linear in length), never eager
    attention ([batch, heads, T, T] weights per layer: GBs at 1024 tokens)."""
    from cai.config import compose
    from cai.modules.pm import PMModule
    from cai.modules.sft import SFTModule

    cfg = compose([])
    for stage in ("sft", "pm", "judge"):
        assert cfg[stage].cpu_attention == "sdpa", stage
        assert cfg[stage].micro_batch_tokens is not None, stage
    model, _ = tiny
    model.set_attn_implementation("eager")  # whatever the model came with
    for cls, stage in ((SFTModule, cfg.sft), (PMModule, cfg.pm)):
        module = cls.from_config(model, stage, cfg.trainer)
        module.on_fit_start()
        assert model.config._attn_implementation == "sdpa"
        module.on_fit_end()
        assert model.config._attn_implementation == "eager"  # the saved model keeps its own


def test_peak_memory_window_and_summary_table(tmp_path):
    from omegaconf import OmegaConf

    from cai.memory import peak_gb, reset_peak
    from cai.pipeline import summary_table

    block = torch.ones(300_000_000, dtype=torch.uint8)  # 0.3 GB touched
    high = peak_gb()
    del block
    if reset_peak():
        assert peak_gb() < high - 0.2
    cfg = OmegaConf.create(
        {"pipeline": {"figures": True}, "paths": {"results_dir": "R", "figures_dir": "F"}}
    )
    table = summary_table(
        [
            {"stage": "sft", "built": True, "wall_s": 12.5, "peak_memory_gb": 2.5},
            {"stage": "pm", "built": False, "wall_s": 0.0, "peak_memory_gb": 0.4},
        ],
        cfg,
        str(tmp_path),
    )
    lines = table.splitlines()
    assert lines[1].split() == ["sft", "built", "12.5s", "2.50", "GB"]
    assert lines[2].split() == ["pm", "reused", "0.0s", "0.40", "GB"]
    assert lines[3].split()[:3] == ["total", "12.5s", "2.50"]
    assert "figures:    F" in table


@pytest.mark.skipif(not fork_available(), reason="stage processes need fork (Linux)")
def test_a_stage_process_returns_its_result_and_peak_and_gives_its_memory_back():
    def stage():  # no tensor work: this test process has started torch's threads (see
        # cai.pipeline.run: only a process that has not forks its stages)
        block = bytearray(b"\x01") * 400_000_000  # 0.4 GB touched in the child
        return {"sum": sum(block[:10])}

    before = rss_gb()
    result, peak = in_child_process(stage)
    assert result == {"sum": 10}
    assert peak >= 0.4  # the child's own high-water mark includes the block
    assert rss_gb() < before + 0.1  # nothing of it stays in this process


@pytest.mark.skipif(not fork_available(), reason="stage processes need fork (Linux)")
def test_a_stage_process_error_is_raised_here_and_a_killed_one_is_named():
    import os
    import signal

    from cai.errors import ConfigError
    from cai.memory import StageProcessError

    def bad_settings():
        raise ConfigError("sft.lr=-1: use a positive learning rate.")

    with pytest.raises(ConfigError, match="positive learning rate"):
        in_child_process(bad_settings)
    with pytest.raises(StageProcessError, match="SIGKILL.*out-of-memory"):
        in_child_process(lambda: os.kill(os.getpid(), signal.SIGKILL))


def test_judge_weights_setting_is_checked_before_any_work():
    from cai.config import compose
    from cai.errors import ConfigError
    from cai.stages.judge import check_settings

    check_settings(compose(["judge.weights=float32"]))
    with pytest.raises(ConfigError, match="judge.weights='half': use auto or float32"):
        check_settings(compose(["judge.weights=half"]))


def test_batches_are_padded_to_widths_from_a_small_set_without_changing_the_maths(tiny):
    """oneDNN keeps a kernel per matrix shape (memory grew ~30 MB a training step when every
    batch had its own width): batches are right-padded to multiples of 32 tokens, which changes
    no loss or reward (causal mask, right padding)."""
    from cai.memory import padded_width
    from cai.modules.pm import EncodedPair, collate_pairs, init_preference_model, rewards
    from cai.modules.sft import collate, encode_example, response_nll, sft_micro_batches

    assert [padded_width(n) for n in (1, 31, 32, 33, 64, 65)] == [32, 32, 32, 64, 64, 96]
    model, tokenizer = tiny
    examples = [
        encode_example(tokenizer, f"Question {i}?", "Sure. " * (1 + 5 * i), "chat", f"p{i}")
        for i in range(3)
    ]
    batch = collate(examples, tokenizer.pad_token_id)
    longest = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape[1] == padded_width(longest) > longest
    for part in sft_micro_batches(batch, 64):
        assert part["input_ids"].shape[1] % 32 == 0
    trimmed = {k: v[:, :longest] for k, v in batch.items()}
    with torch.no_grad():
        assert torch.allclose(response_nll(model, batch), response_nll(model, trimmed), atol=1e-5)

    from cai.config import compose

    cfg = compose(["model=tiny"])
    pm, tokenizer = init_preference_model(cfg.model, cfg.paths.cache_dir, seed=0)
    pairs = [EncodedPair(list(range(5, 40)), list(range(20, 30)), 0.7)]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[1] == 64
    with torch.no_grad():
        padded = rewards(pm, batch["input_ids"], batch["last"])
        plain = rewards(pm, batch["input_ids"][:, :35], batch["last"])
    assert torch.allclose(padded, plain, atol=1e-5)


def test_a_judge_trains_only_its_top_layers_and_head():
    """judge.train_layers: embeddings and lower layers frozen (no gradient, no optimiser
    state, unchanged by a step); the top layers, final norm and score head move."""
    from cai.config import compose
    from cai.errors import ConfigError
    from cai.modules.pm import (
        EncodedPair,
        PMModule,
        collate_pairs,
        init_preference_model,
        train_top_layers,
    )
    from cai.settings import check_settings as check_numbers

    cfg = compose(["model=tiny"])
    pm, tokenizer = init_preference_model(cfg.model, cfg.paths.cache_dir, seed=0)
    layers = pm.model.layers
    assert len(layers) >= 2
    trainable = train_top_layers(pm, 1)
    names = {n for n, p in pm.named_parameters() if p.requires_grad}
    top = f"model.layers.{len(layers) - 1}."
    assert names and all(n.startswith((top, "model.norm", "score")) for n in names), names
    assert any(n.startswith("score") for n in names) and any(n.startswith(top) for n in names)
    assert trainable == sum(p.numel() for n, p in pm.named_parameters() if n in names)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    module = PMModule(pm, 1e-2, 0.0, (0.9, 0.95), 1)
    optimizer = module.configure_optimizers()["optimizer"]
    batch = collate_pairs([EncodedPair(list(range(5, 20)), list(range(30, 40)), 0.9)], 0)
    module.training_step(batch, 0).backward()
    optimizer.step()
    for name, param in pm.named_parameters():
        moved = not torch.equal(param.detach(), before[name])
        assert moved == (name in names) or (name in names and param.grad is None), name
    assert train_top_layers(pm, 99) == sum(p.numel() for p in pm.parameters())  # all of them
    with pytest.raises(ConfigError, match="judge.train_layers=0"):
        check_numbers(compose(["judge.train_layers=0"]))
    with pytest.raises(ConfigError, match="generation.score_batch_size=0"):
        check_numbers(compose(["generation.score_batch_size=0"]))
    check_numbers(compose(["judge.train_layers=null"]))
