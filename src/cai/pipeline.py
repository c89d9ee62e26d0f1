"""The stage runner: `cfg.pipeline.stages` in order, each a plain function over config and
upstream artifacts, each writing one artifact folder keyed by what determines its content.

A stage is a function `fn(cfg, upstream, work_dir) -> metrics`:
- `upstream` maps upstream stage names to finished `Artifact`s;
- it writes its files into `work_dir` (kept across a crash, so it can resume from it);
- it returns a dict of metrics (JSON-able) that goes into the manifest.

The key of an artifact hashes the stage's own config subtrees (`config_keys`), the seed, the
stage version and the keys of its upstream artifacts: change any of them and the key changes,
change anything else (paths, logger, other stages' settings) and it does not. So sweep jobs
share every upstream artifact they agree on, and a rerun after a crash resumes.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cai.artifacts import (
    Artifact,
    ArtifactStore,
    hash_payload,
    write_json_atomic,
    write_text_atomic,
)
from cai.errors import ArtifactError, ConfigError
from cai.memory import (
    fork_available,
    in_child_process,
    process_peak_gb,
    release_freed_memory,
    rss_gb,
)
from cai.modules.training import is_follower

log = logging.getLogger(__name__)

StageFn = Callable[[DictConfig, dict[str, Artifact], Path], dict]


@dataclass(frozen=True)
class Stage:
    name: str
    fn: StageFn
    config_keys: tuple[str, ...]  # config subtrees that determine the artifact's content
    upstream: tuple[str, ...] = ()  # stages whose artifacts this one reads
    version: int = 1  # bump when the stage's code changes what it writes
    seeded: bool = True  # the artifact depends on cfg.seed
    ignore: tuple[str, ...] = field(default=())  # dotted keys inside config_keys that do not matter
    content: Callable[[DictConfig], dict] | None = None  # fingerprints of input files, for the key
    check: Callable[[DictConfig], None] | None = None  # raises ConfigError on bad settings
    distributed: bool = False  # trains with Lightning: every process of a multi-device run joins
    follower_walk: Callable[[DictConfig], None] | None = None  # what a follower process does
    # instead of waiting (eval: walk the RL variants' chains, joining their training)


# Filled by `_register_stages()` at the end of this module; tests may add their own.
STAGES: dict[str, Stage] = {}


def stage_inputs(cfg: DictConfig, name: str) -> dict:
    """Everything that determines stage `name`'s artifact under `cfg` (hashed into its key)."""
    stage = get_stage(name)
    config = {}
    for key in stage.config_keys:
        node = OmegaConf.select(cfg, key, throw_on_missing=True)
        config[key] = (
            OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        )
    for dotted in stage.ignore:
        head, _, tail = dotted.partition(".")
        if isinstance(config.get(head), dict):
            _drop(config[head], tail)
    return {
        "stage": name,
        "version": stage.version,
        "config": config,
        "seed": int(cfg.seed) if stage.seeded else None,
        "upstream": {u: artifact_key(cfg, u) for u in stage.upstream},
        "content": stage.content(cfg) if stage.content else None,
    }


def artifact_key(cfg: DictConfig, name: str) -> str:
    return hash_payload(stage_inputs(cfg, name))


def _drop(tree: dict, dotted: str) -> None:
    head, _, tail = dotted.partition(".")
    if tail and isinstance(tree.get(head), dict):
        _drop(tree[head], tail)
    else:
        tree.pop(head, None)


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(
            f"Unknown stage {name!r} in pipeline.stages. Known stages, in pipeline "
            f"order: {', '.join(STAGES)}."
        )
    return STAGES[name]


def run(cfg: DictConfig, stage_processes: bool = False) -> dict[str, Artifact]:
    """Run `cfg.pipeline.stages` in order; return the finished artifacts by stage name.

    stage_processes: run each stage in a forked process of its own where `isolated_stages`
    allows. Only for a process that has not run tensor work itself (the command line): a fork
    after torch has started its OpenMP threads can hang the child, so in-process callers
    (notebooks, tests) keep the stages in their own process."""
    from cai.settings import check_settings

    check_settings(cfg)  # types and ranges of every numeric setting, before any work
    stages = list(cfg.pipeline.stages)
    check_force(cfg)
    for name in stages:  # fail on a typo or conflicting settings before any work starts
        stage = get_stage(name)
        if stage.check is not None:
            stage.check(cfg)
    store = ArtifactStore(cfg.paths.artifact_dir, verify=str(cfg.pipeline.get("verify", "sha256")))
    artifacts: dict[str, Artifact] = {}
    summary = []
    follower = is_follower()
    if follower:
        log.info("Follower process of a multi-device run: joining training, writing nothing.")
    isolate = stage_processes and isolated_stages(cfg)
    if isolate:
        preload_stage_modules()
    for name in stages:
        start, start_memory = time.perf_counter(), rss_gb()
        if follower:
            artifact, built = follow(cfg, name, store, artifacts), False
            peak = process_peak_gb()
        elif isolate:  # the stage in its own process: its memory all goes back when it ends
            (artifact, built), peak = in_child_process(
                lambda name=name: ensure_artifact(
                    cfg, name, store, artifacts, force=forced(cfg, name)
                )
            )
        else:
            artifact, built = ensure_artifact(cfg, name, store, artifacts, force=forced(cfg, name))
            peak = process_peak_gb()
        artifacts[name] = artifact
        summary.append(
            {
                "stage": name,
                "key": artifact.key,
                "path": str(artifact.path),
                "built": built,
                "wall_s": round(time.perf_counter() - start, 3),
                "start_memory_gb": start_memory,  # resident when the stage started
                # the stage's own peak (its process's) when isolated, else the process's so far
                "peak_memory_gb": peak,
                "isolated": isolate,  # (never a follower: isolated_stages)
            }
        )
        release_freed_memory()
        log.info("%s %s: %s", name, "built" if built else "reused", artifact.path)
    output_dir = _hydra_output_dir()
    if output_dir is not None and not follower:
        write_json_atomic(Path(output_dir) / "pipeline_summary.json", summary)
        if rows := _run_rows(artifacts):
            from cai.results import write_rows

            write_rows(Path(output_dir) / "results.csv", rows)
            _publish(cfg, Path(output_dir), rows, _calibration_rows(artifacts))
    if summary and not follower:
        print(summary_table(summary, cfg, output_dir), flush=True)
    return artifacts


def preload_stage_modules() -> None:
    """Import what the stages import inside their functions once, here, so each forked stage
    process inherits it instead of importing it again (imports start no torch threads)."""
    import importlib

    for module in (
        "pytorch_lightning",
        "transformers.models.llama.modeling_llama",
        "cai.critique",
        "cai.feedback",
        "cai.generation.hf",
        "cai.modules.sft",
        "cai.modules.pm",
        "cai.modules.ppo",
        "cai.eval.judges",
        "cai.eval.compare",
    ):
        importlib.import_module(module)


def isolated_stages(cfg: DictConfig) -> bool:
    """Whether each stage runs in a forked process of its own (`pipeline.isolate_stages`): on
    Linux, for a single-process run. Multi-device runs (several Lightning processes that meet
    in every fit) keep the stages in the launched processes."""
    if not cfg.pipeline.get("isolate_stages", True) or not fork_available():
        return False
    devices = cfg.trainer.get("devices", 1)
    several = (isinstance(devices, int) and devices > 1) or str(devices) in ("-1", "auto")
    return not several and int(cfg.trainer.get("num_nodes", 1) or 1) == 1 and not is_follower()


def summary_table(summary: list[dict], cfg: DictConfig, output_dir: str | None) -> str:
    """What `make run` prints at the end: wall time and peak memory per stage, and where the
    results and figures are."""
    lines = [f"{'stage':<16}{'':<8}{'wall':>10}{'peak memory':>14}"]
    for entry in summary:
        lines.append(
            f"{entry['stage']:<16}{'built' if entry['built'] else 'reused':<8}"
            f"{entry['wall_s']:>9.1f}s{entry['peak_memory_gb']:>11.2f} GB"
        )
    total = sum(e["wall_s"] for e in summary)
    lines.append(
        f"{'total':<24}{total:>9.1f}s{max(e['peak_memory_gb'] for e in summary):>11.2f} GB"
        " (the largest stage's)"
    )
    if output_dir is not None:
        lines.append(f"run folder: {output_dir} (pipeline_summary.json, results.csv, train.log)")
    if cfg.pipeline.get("figures", True) and output_dir is not None:
        lines.append(f"results:    {cfg.paths.results_dir}")
        lines.append(f"figures:    {cfg.paths.figures_dir}")
    return "\n".join(lines)


def forced(cfg: DictConfig, name: str) -> bool:
    """Whether `pipeline.force` asks to rebuild stage `name`: true (every listed stage) or a
    list of stage names."""
    force = cfg.pipeline.force
    if isinstance(force, bool):
        return force
    return name in [str(f) for f in (force or [])]


def check_force(cfg: DictConfig) -> None:
    force = cfg.pipeline.force
    if isinstance(force, bool) or force is None:
        return
    if isinstance(force, str) or not all(isinstance(f, str) for f in force):
        raise ConfigError(
            f"pipeline.force={force!r}: use true, false or a list of stages, e.g. "
            "pipeline.force=[sft]."
        )
    for name in force:
        get_stage(str(name))


def _publish(
    cfg: DictConfig, output_dir: Path, rows: list[dict], calibration: list[dict] | None = None
) -> None:
    """The run's rows into results/runs/<run>.csv; the figures redrawn from all of results/."""
    from cai.results import write_rows

    try:
        name = "_".join(
            output_dir.resolve().relative_to(Path(cfg.paths.output_dir).resolve()).parts
        )
    except ValueError:
        name = output_dir.name
    target = Path(cfg.paths.results_dir) / "runs" / f"{name}.csv"
    write_rows(target, rows)
    log.info("Result rows of this run: %s", target)
    if calibration:  # the HHH reliability table (Figure 9), with the model it measured
        from cai.results import write_csv

        records = [r | {"model": cfg.model.name} for r in calibration]
        write_csv(target.with_name(f"{name}_hhh_calibration.csv"), records, list(records[0]))
    if cfg.pipeline.get("figures", True):
        from cai.analysis.figures import make_figures

        written = make_figures(cfg.paths.results_dir, cfg.paths.figures_dir)
        log.info("Figures from %s: %s", cfg.paths.results_dir, Path(written[0]).parent)


def _stamp_rows(path: Path, key: str) -> None:
    """Result rows name the artifact that measured them (`run_id`)."""
    from cai.results import read_rows, write_rows

    if path.is_file():
        write_rows(path, [{**r, "run_id": r["run_id"] or key} for r in read_rows(path)])


def _calibration_rows(artifacts: dict[str, Artifact]) -> list[dict]:
    """The eval_hhh stage's reliability table of this run ([] without one)."""
    import csv

    artifact = artifacts.get("eval_hhh")
    path = artifact.path / "calibration.csv" if artifact else None
    if path is None or not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _run_rows(artifacts: dict[str, Artifact]) -> list[dict]:
    """The result rows of every stage of this run (results.csv beside the run's logs)."""
    from cai.results import read_rows

    return [
        r
        for artifact in artifacts.values()
        if (artifact.path / "rows.csv").is_file()
        for r in read_rows(artifact.path / "rows.csv")
    ]


def ensure_artifact(
    cfg: DictConfig,
    name: str,
    store: ArtifactStore,
    this_run: dict[str, Artifact],
    force: bool = False,
) -> tuple[Artifact, bool]:
    """Return stage `name`'s finished artifact, building it if needed; and whether it was built."""
    stage = get_stage(name)
    upstream = {
        u: this_run.get(u) or _require(cfg, u, store, needed_by=name) for u in stage.upstream
    }
    inputs = stage_inputs(cfg, name)
    key = hash_payload(inputs)
    if not force and (done := store.get(name, key)) is not None:
        return done, False
    with store.lock(name, key):
        if not force and (done := store.get(name, key)) is not None:
            return done, False  # a sibling job finished it while we waited for the lock
        work_dir = store.start(name, key, fresh=force)
        log.info("Building %s (key %s) in %s", name, key, work_dir)
        started = time.time()
        try:
            metrics = stage.fn(cfg, upstream, work_dir) or {}
        except Exception as error:
            if (storage := _storage_error(name, work_dir, error)) is None:
                raise
            raise storage from error
        _stamp_rows(work_dir / "rows.csv", key)
        manifest = {
            **inputs,
            "metrics": metrics,
            "timings": {
                "started": started,
                "finished": time.time(),
                "wall_s": round(time.time() - started, 3),
            },
            "versions": _versions(),
        }
        return store.finish(name, key, manifest), True


def _storage_error(name: str, work_dir: Path, error: Exception) -> ArtifactError | None:
    """A full disk or an unwritable folder (an OSError, or safetensors' own error type): one
    message naming the path. None for any other error, which passes through unchanged."""
    import errno

    storage = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
    if isinstance(error, OSError):
        if error.errno not in storage:
            return None
    elif "No space left on device" not in str(error):
        return None
    path = getattr(error, "filename", None) or work_dir
    reason = getattr(error, "strerror", None) or str(error)
    return ArtifactError(
        f"Stage {name!r} could not write {path}: {reason}. Free space or fix permissions (or "
        f"point paths.output_dir elsewhere), then run the same command again: the finished "
        f"work in {work_dir} is kept and resumed."
    )


def build_with_upstream(cfg: DictConfig, name: str) -> dict[str, Artifact]:
    """Stage `name`'s artifact under `cfg` and all its upstream artifacts, each built or reused
    (the eval stage builds the RL variants it compares this way). Returns {stage: artifact}."""
    store = ArtifactStore(cfg.paths.artifact_dir, verify=str(cfg.pipeline.get("verify", "sha256")))
    built: dict[str, Artifact] = {}

    def ensure(stage_name: str) -> None:
        stage = get_stage(stage_name)
        for upstream in stage.upstream:
            if upstream not in built:
                ensure(upstream)
        if stage.check is not None:
            stage.check(cfg)
        if is_follower():
            built[stage_name] = follow(cfg, stage_name, store, built)
        else:
            built[stage_name], _ = ensure_artifact(cfg, stage_name, store, built)

    ensure(name)
    return built


def follow(cfg: DictConfig, name: str, store: ArtifactStore, this_run: dict) -> Artifact:
    """What a follower process (a second device's process, `is_follower()`) does for a stage:
    take part in its training (distributed stages: the same stage function, which joins rank
    0's fit and writes nothing), then wait for global rank 0 to finish the artifact. It never
    builds, locks or writes an artifact, so the processes of one run cannot contend."""
    stage = get_stage(name)
    key = artifact_key(cfg, name)
    if not forced(cfg, name) and (done := store.get(name, key)) is not None:
        return done  # finished before this run: rank 0 reuses it too, no training to join
    if stage.follower_walk is not None:
        stage.follower_walk(cfg)
    elif stage.distributed:
        upstream = {u: this_run.get(u) or wait_for(cfg, store, u) for u in stage.upstream}
        work_dir = store.work_folder(name, key)
        work_dir.mkdir(parents=True, exist_ok=True)
        stage.fn(cfg, upstream, work_dir)
    return wait_for(cfg, store, name)


def wait_for(cfg: DictConfig, store: ArtifactStore, name: str) -> Artifact:
    """Block until global rank 0 has finished stage `name`'s artifact for `cfg`."""
    key = artifact_key(cfg, name)
    deadline = time.time() + float(cfg.pipeline.get("follower_timeout_s", 86400))
    while (artifact := store.get(name, key)) is None:
        if time.time() > deadline:
            raise ArtifactError(
                f"Waited pipeline.follower_timeout_s for global rank 0 to finish {name} ({key}) "
                f"in {store.root}; did the rank 0 process stop? See its log."
            )
        time.sleep(1.0)
    return artifact


def _require(cfg: DictConfig, name: str, store: ArtifactStore, needed_by: str) -> Artifact:
    key = artifact_key(cfg, name)
    artifact = store.get(name, key)
    if artifact is None:
        raise ArtifactError(
            f"Stage {needed_by!r} needs the {name!r} artifact (key {key}), which is not built for "
            f"this config. Add {name} before {needed_by} in pipeline.stages, e.g. "
            f"pipeline.stages=[{name},{needed_by}]."
        )
    return artifact


def _versions() -> dict[str, str]:
    import torch
    import transformers

    import cai

    return {
        "cai": cai.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _hydra_output_dir() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except Exception:  # not inside a Hydra run
        return None


def _register_stages() -> None:
    """The pipeline's stages, in order. Each later stage adds its line here."""
    from cai import critique, feedback, pairs
    from cai.data import hh_split_rule
    from cai.eval import compare, hhh, judges
    from cai.modules import pm, ppo, sft
    from cai.paper_samples import fingerprint as paper_samples_fingerprint

    trainer_runtime = (
        "trainer.enable_progress_bar",
        "trainer.default_root_dir",
        "trainer.log_every_n_steps",
        "trainer.enable_model_summary",
        "trainer.enable_checkpointing",
        "trainer.use_distributed_sampler",
    )
    runtime_only = (
        "generation.batch_size",
        "generation.score_batch_size",
        "generation.progress",
        "generation.device",
    )
    STAGES.update(
        {
            "generate_sl": Stage(
                "generate_sl",
                critique.run_stage,
                config_keys=("model", "constitution", "data", "sl", "generation"),
                version=2,  # 2: finish reasons kept (SFT gives cut-off texts no end token)
                ignore=("sl.num_revisions", *runtime_only),
                content=critique.stage_inputs,
            ),
            "sft": Stage(
                "sft",
                sft.run_stage,
                distributed=True,
                config_keys=("model", "sft", "sl.num_revisions", "trainer"),
                upstream=("generate_sl",),
                ignore=("sft.checkpoint_every", *trainer_runtime),
            ),
            "generate_pairs": Stage(
                "generate_pairs",
                pairs.run_stage,
                config_keys=("model", "data", "pairs", "generation"),
                upstream=("sft",),
                ignore=("pairs.chunk_size", *runtime_only),
                content=critique.stage_inputs,
            ),
            "feedback": Stage(
                "feedback",
                feedback.run_stage,
                config_keys=("model", "constitution", "feedback", "generation"),
                upstream=("generate_pairs", "sft"),
                ignore=("feedback.chunk_size", *runtime_only),
                content=critique.stage_inputs,
                check=lambda cfg: feedback.FeedbackSettings.from_config(cfg.feedback),
            ),
            "pm": Stage(
                "pm",
                pm.run_stage,
                distributed=True,
                config_keys=("model", "pm", "trainer", "judge.validation"),
                version=3,  # 3: seeded head, validation against the paper's PM (PALMS)
                upstream=("feedback", "sft"),
                ignore=(
                    "pm.checkpoint_every",
                    "pm.eval_batch_size",
                    *trainer_runtime,
                ),
                content=lambda cfg: {
                    "hh_rlhf_splits": hh_split_rule(),
                    "paper_samples": paper_samples_fingerprint(cfg.paths.data_dir),
                },
            ),
            "ppo": Stage(
                "ppo",
                ppo.run_stage,
                distributed=True,
                config_keys=("model", "data", "ppo", "trainer"),
                upstream=("sft", "pm"),
                ignore=("ppo.checkpoint_every", *trainer_runtime),
                content=critique.stage_inputs,
                check=ppo.check_settings,
            ),
            "judge": Stage(
                "judge",
                judges.run_stage,
                distributed=True,
                config_keys=("judge", "trainer"),  # init names its model: one judge for all
                version=3,  # 3: seeded head, paper_pm, PALMS validation, data fingerprints
                ignore=("judge.checkpoint_every", "judge.eval_batch_size", *trainer_runtime),
                content=judges.stage_inputs,
                check=judges.check_settings,
            ),
            "eval": Stage(
                "eval",
                compare.run_stage,
                config_keys=(
                    "model",
                    "data",
                    "constitution",
                    "eval",
                    "sl.num_revisions",
                    "generation",
                    "feedback.model",  # the AI judge's independence is recorded in its rows
                    "feedback.helpfulness_principle",
                ),
                upstream=("generate_sl", "sft", "judge"),
                ignore=("eval.ai_feedback.chunk_size", *runtime_only),
                content=compare.stage_inputs,
                check=compare.check_settings,
                follower_walk=lambda cfg: [
                    build_with_upstream(v, "ppo") for v in compare.rl_variants(cfg).values()
                ],
            ),
            "eval_hhh": Stage(
                "eval_hhh",
                hhh.run_stage,
                config_keys=("model", "constitution", "eval_hhh", "generation"),
                ignore=runtime_only,
                content=lambda cfg: {**critique.stage_inputs(cfg), **hhh.stage_inputs(cfg)},
                check=hhh.check_settings,
            ),
        }
    )


def run_from_config(cfg: DictConfig, stage_processes: bool = False) -> dict[str, Artifact]:
    """What the command line calls (cai.cli.train, with stage_processes=True): resolve model
    presets, log the plan, run the stages."""
    from cai.config import resolve_model

    cfg = resolve_model(cfg)
    stages = list(cfg.pipeline.stages)
    log.info("Model %s (%s), stages: %s", cfg.model.name, cfg.model.source, stages or "none")
    output_dir = _hydra_output_dir()
    if output_dir is not None:  # the config as run, model preset resolved
        write_text_atomic(Path(output_dir) / "config_resolved.yaml", OmegaConf.to_yaml(cfg))
    if not stages:
        log.warning("pipeline.stages is empty: nothing to run.")
    return run(cfg, stage_processes)


_register_stages()
