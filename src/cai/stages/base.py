"""What a pipeline stage is: a short declaration the runner (cai.pipeline) reads.

A stage declares its upstream stages, the config groups it reads (`settings`), the keys inside
them that change how it runs but not what it writes (`runtime`), its version, and its `run`.
The artifact key is derived from that declaration alone (`Stage.inputs`): it hashes the
stage's settings, the seed, the version, the keys of its upstream artifacts, fingerprints of
the files it reads and the dtype this machine resolves `auto` to (cai.models.numerics). Change
any of them and the key changes; change anything else (paths, the logger, another stage's
settings) and it does not, so sweep jobs share every upstream artifact
they agree on and a rerun after a crash resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cai.artifacts import Artifact
from cai.models import numerics

# `run(cfg, inputs, work_dir) -> metrics`: reads its upstream artifacts from `inputs` (stage
# name -> finished artifact; an RL variant's as "<variant>:<stage>"), writes its files into
# `work_dir` (kept across a crash, so it can resume) and returns JSON-able metrics for the
# manifest.
RunFn = Callable[[DictConfig, dict[str, Artifact], Path], dict]

# Settings that change how fast a stage runs, never what it writes.
GENERATION_RUNTIME = (
    "generation.batch_size",
    "generation.score_batch_size",
    "generation.progress",
    "generation.device",
)
# How a served labeller is called (`<group>.endpoint`), never what it answers.
ENDPOINT_RUNTIME = ("api_key_env", "concurrency", "timeout_s", "retries", "backoff_s")
TRAINER_RUNTIME = (
    "trainer.enable_progress_bar",
    "trainer.default_root_dir",
    "trainer.log_every_n_steps",
    "trainer.enable_model_summary",
    "trainer.enable_checkpointing",
    "trainer.use_distributed_sampler",
)


@dataclass(frozen=True)
class Stage:
    name: str  # = its conf/ group and its file in cai/stages/
    run: RunFn
    settings: tuple[str, ...]  # config subtrees that determine the artifact's content
    upstream: tuple[str, ...] = ()  # stages whose artifacts it reads
    version: int = 1  # bump when the stage's code changes what it writes
    runtime: tuple[str, ...] = ()  # dotted keys inside `settings` that do not matter
    seeded: bool = True  # the artifact depends on cfg.seed
    # the seed it draws from when not cfg.seed (the judge's judge.seed: one judge for every seed)
    seed_of: Callable[[DictConfig], int] | None = None
    fingerprints: Callable[[DictConfig], dict] | None = None  # of the input files it reads
    check: Callable[[DictConfig], None] | None = None  # raises ConfigError on bad settings
    # settings that this config does not use (dotted keys, dropped from the key like `runtime`),
    # e.g. feedback.endpoint unless feedback.model=http
    inert: Callable[[DictConfig], tuple[str, ...]] | None = None
    distributed: bool = False  # trains with Lightning: every process of a multi-device run joins
    # RL variants it compares (eval): {name: (config, last stage: ppo or dpo)}; the runner plans
    # and builds each one's chain up to its last stage before this stage, and passes the
    # artifacts in as "<name>:<stage>"
    variants: Callable[[DictConfig], dict[str, tuple[DictConfig, str]]] | None = None

    def inputs(
        self, cfg: DictConfig, upstream_keys: dict[str, str], variant_keys: dict[str, str]
    ) -> dict:
        """Everything that determines this stage's artifact under `cfg` (hashed into its key),
        given the keys of its upstream artifacts and of its variants' last artifacts."""
        config = {}
        for key in self.settings:
            node = OmegaConf.select(cfg, key, throw_on_missing=True)
            config[key] = (
                OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
            )
        for dotted in (*self.runtime, *(self.inert(cfg) if self.inert else ())):
            head, _, tail = dotted.partition(".")
            if dotted in config:  # a declared setting itself
                config.pop(dotted)
            elif isinstance(config.get(head), dict):
                _drop(config[head], tail)
        content = self.fingerprints(cfg) if self.fingerprints else None
        if self.variants is not None:
            content = {**(content or {}), "rl_variants": variant_keys}
        return {
            "stage": self.name,
            "version": self.version,
            "config": config,
            "seed": (self.seed_of(cfg) if self.seed_of else int(cfg.seed)) if self.seeded else None,
            "upstream": upstream_keys,
            "content": content,
            # the dtype `auto` resolves to here: one key, one dtype (README, "Determinism")
            "numerics": numerics(),
        }


def _drop(tree: dict, dotted: str) -> None:
    head, _, tail = dotted.partition(".")
    if tail and isinstance(tree.get(head), dict):
        _drop(tree[head], tail)
    else:
        tree.pop(head, None)


def variant_inputs(inputs: dict[str, Artifact], name: str) -> dict[str, Artifact]:
    """RL variant `name`'s artifacts among a stage's inputs: {stage: artifact}."""
    prefix = f"{name}:"
    return {k[len(prefix) :]: a for k, a in inputs.items() if k.startswith(prefix)}
