"""Text generation for every stage that samples: `build_engine(cfg.generation, ...)`."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from cai.errors import ConfigError
from cai.generation.base import (
    Generation,
    GenerationEngine,
    OptionScores,
    Request,
    ScoreRequest,
    request_seed,
)
from cai.generation.hf import HFEngine
from cai.generation.http import Endpoint, HTTPEngine
from cai.generation.vllm import VLLMEngine, require_vllm
from cai.models import load_model, load_tokenizer, model_folder


def resolve_device(name: str) -> str:
    """`generation.device`: auto = the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"generation.device={name}, but torch sees no CUDA GPU: use cpu or auto.")
    return name


def build_engine(
    gen_cfg: DictConfig, model_cfg: DictConfig, cache_dir: str, model=None
) -> GenerationEngine:
    """The engine for `generation.backend` (hf or vllm), with its model loaded.

    model: an already loaded model of `model_cfg` (e.g. the policy PPO trains); the hf engine
    generates with it as it is (shared weights, its dtype and device), vLLM loads its own copy
    from the folder and takes new weights through `update_weights`."""
    if gen_cfg.backend == "hf":
        if model is not None:
            tokenizer = load_tokenizer(model_cfg, cache_dir)
        else:
            model, tokenizer = load_model(model_cfg, cache_dir, dtype=gen_cfg.get("dtype"))
            model.to(resolve_device(str(gen_cfg.get("device", "auto"))))
        return HFEngine(
            model,
            tokenizer,
            batch_size=int(gen_cfg.batch_size),
            score_batch_size=gen_cfg.get("score_batch_size"),
            prefix_cache=bool(gen_cfg.prefix_cache),
            progress=bool(gen_cfg.progress),
        )
    if gen_cfg.backend == "vllm":
        require_vllm()
        if model_cfg.source == "random" and not model_cfg.get("path"):
            raise ConfigError(
                "generation=vllm loads models from a folder: save the random model "
                "first and pass model.path, or use generation=hf."
            )
        return VLLMEngine(
            model_folder(model_cfg, cache_dir),
            gen_cfg,
            dtype=str(gen_cfg.get("dtype", "auto")),
            trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
        )
    raise ConfigError(f"generation.backend={gen_cfg.backend!r}: use hf or vllm.")


def endpoint_engine(node: DictConfig | None, setting: str, progress: bool = True) -> HTTPEngine:
    """The served labeller that `<setting>` (e.g. feedback.endpoint) describes: an
    OpenAI-compatible completions endpoint (cai.generation.http)."""
    if node is None or not node.get("url"):
        owner = setting.rsplit(".", 1)[0]
        raise ConfigError(
            f"{owner}.model=http needs {setting}.url: the server's base URL, e.g. "
            f"{setting}.url=http://localhost:8000/v1 (vLLM, TGI, SGLang or llama.cpp's server)."
        )
    return HTTPEngine(
        Endpoint(
            url=str(node.url),
            model=str(node.get("model") or ""),
            api_key_env=node.get("api_key_env"),
            concurrency=int(node.concurrency),
            timeout_s=float(node.timeout_s),
            retries=int(node.retries),
            backoff_s=float(node.backoff_s),
            setting=setting,
        ),
        progress=progress,
    )


def engine_tokenizer(engine: GenerationEngine, model_cfg: DictConfig, cache_dir: str):
    """The engine's tokenizer (vLLM's engine has none of ours: load the model's)."""
    tokenizer = getattr(engine, "tokenizer", None)
    return tokenizer if tokenizer is not None else load_tokenizer(model_cfg, cache_dir)


__all__ = [
    "Endpoint",
    "HTTPEngine",
    "endpoint_engine",
    "Generation",
    "GenerationEngine",
    "OptionScores",
    "Request",
    "ScoreRequest",
    "build_engine",
    "engine_tokenizer",
    "request_seed",
]
