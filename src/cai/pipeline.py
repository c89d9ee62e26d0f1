"""The stage runner: plans the experiment as a graph of stage instances before anything runs,
then builds (or reuses) each one in order, each writing one artifact folder keyed by what
determines its content (cai.stages.base.Stage.inputs).

A stage instance is one stage (cai.stages) under one config: the run's own stages
(`pipeline.stages`) under the run's config, and the stages an RL variant needs (eval.variants:
RL-CAI with CoT feedback, the baselines) under the run's config with the variant's overrides.
Instances with the same stage and key are one instance, so a variant shares every upstream
artifact it agrees on with the run. `pipeline.plan=true` prints the plan (each instance, built
or reused, its key) and exits.

Multi-process rank logic lives here only: a follower process (a second device's) walks the
same plan, joins each distributed stage's training and waits for rank 0's artifacts.
"""

from __future__ import annotations

import csv
import errno
import importlib
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import cai
from cai.analysis.figures import make_figures
from cai.artifacts import (
    Artifact,
    ArtifactStore,
    hash_payload,
    write_json_atomic,
    write_text_atomic,
)
from cai.config import resolve_model
from cai.errors import ArtifactError, ConfigError
from cai.memory import (
    fork_available,
    in_child_process,
    process_peak_gb,
    release_freed_memory,
    rss_gb,
)
from cai.models import machine
from cai.modules.training import is_follower
from cai.results import read_rows, write_csv, write_rows
from cai.settings import typed_config
from cai.stages import STAGES
from cai.stages.base import Stage

log = logging.getLogger(__name__)


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(
            f"Unknown stage {name!r} in pipeline.stages. Known stages, in pipeline "
            f"order: {', '.join(STAGES)}."
        )
    return STAGES[name]


# ---------------------------------------------------------------------------------------------
# 1. Keys and the plan


def stage_inputs(cfg: DictConfig, name: str) -> dict:
    """Everything that determines stage `name`'s artifact under `cfg` (hashed into its key)."""
    stage = get_stage(name)
    upstream = {u: artifact_key(cfg, u) for u in stage.upstream}
    variants = (
        {v: artifact_key(vcfg, last) for v, (vcfg, last) in stage.variants(cfg).items()}
        if stage.variants
        else {}
    )
    return stage.inputs(cfg, upstream, variants)


def artifact_key(cfg: DictConfig, name: str) -> str:
    return hash_payload(stage_inputs(cfg, name))


@dataclass
class Instance:
    """One stage under one config: what the runner builds or reuses."""

    stage: Stage
    cfg: DictConfig
    key: str
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> instance id
    variant: str | None = None  # the RL variant whose chain it belongs to; None: the run's own
    listed: bool = False  # in pipeline.stages (the run's own; `pipeline.force` applies)
    needed_by: str | None = None  # only read, by this listed stage (built by an earlier run)

    @property
    def id(self) -> str:
        return f"{self.stage.name}/{self.key}"

    @property
    def label(self) -> str:
        return self.stage.name if self.variant is None else f"{self.stage.name}[{self.variant}]"


def plan(cfg: DictConfig) -> tuple[list[Instance], dict[str, Instance]]:
    """The instances to build or reuse, in order; and those the run only reads (the upstream of
    a listed stage that is not listed itself: they must exist already). Each instance comes
    after its upstream; an RL variant's chain comes just before the stage that compares it."""
    ordered: dict[str, Instance] = {}
    required: dict[str, Instance] = {}
    own: dict[str, str] = {}  # stage name -> id of the run's own instance

    def add(name: str, run_cfg: DictConfig, variant: str | None) -> str:
        stage = get_stage(name)
        instance = Instance(stage, run_cfg, artifact_key(run_cfg, name), variant=variant)
        if instance.id in ordered:  # e.g. a variant's sft is the run's own sft
            return instance.id
        for upstream in stage.upstream:
            if variant is not None:  # a variant's chain: everything it needs is planned
                instance.inputs[upstream] = add(upstream, run_cfg, variant)
            elif upstream in own:
                instance.inputs[upstream] = own[upstream]
            else:  # the run's own stage reads an artifact of an earlier run
                key = artifact_key(run_cfg, upstream)
                needed = Instance(get_stage(upstream), run_cfg, key, needed_by=name)
                instance.inputs[upstream] = required.setdefault(needed.id, needed).id
        for other, (other_cfg, last) in (stage.variants(run_cfg) if stage.variants else {}).items():
            last_id = add(last, other_cfg, other)
            for input_name, input_id in _chain(ordered, last_id).items():
                instance.inputs[f"{other}:{input_name}"] = input_id
        ordered[instance.id] = instance
        return instance.id

    for name in cfg.pipeline.stages:
        own[str(name)] = add(str(name), cfg, None)
        ordered[own[str(name)]].listed = True
    return list(ordered.values()), required


def _chain(ordered: dict[str, Instance], last: str) -> dict[str, str]:
    """{stage name: instance id} of instance `last` and everything upstream of it."""
    chain, todo = {}, [last]
    while todo:
        instance = ordered[todo.pop()]
        chain.setdefault(instance.stage.name, instance.id)
        todo += [i for n, i in instance.inputs.items() if ":" not in n and i in ordered]
    return chain


def plan_table(instances: list[Instance], required: dict[str, Instance], store) -> str:
    """What `pipeline.plan=true` prints: every instance, whether it is built or reused, its key."""
    lines = [f"{'stage':<28}{'action':<10}{'key':<18}folder"]
    for needed in required.values():
        status = "read" if store.finished(needed.stage.name, needed.key) else "MISSING"
        lines.append(
            f"{needed.label:<28}{status:<10}{needed.key:<18}"
            f"{store.folder(needed.stage.name, needed.key)}"
        )
    for instance in instances:
        done = store.finished(instance.stage.name, instance.key)
        action = "rebuild" if forced(instance) else ("reuse" if done else "build")
        lines.append(
            f"{instance.label:<28}{action:<10}{instance.key:<18}"
            f"{store.folder(instance.stage.name, instance.key)}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 2. Running the plan


def run(cfg: DictConfig, stage_processes: bool = False) -> dict[str, Artifact]:
    """Plan, check and run `cfg.pipeline.stages` (and the instances they need); return the run's
    own finished artifacts by stage name.

    stage_processes: run each stage in a forked process of its own where `isolated_stages`
    allows. Only for a process that has not run tensor work itself (the command line): a fork
    after torch has started its OpenMP threads can hang the child, so in-process callers
    (notebooks, tests) keep the stages in their own process."""
    typed_config(cfg)  # types, unknown keys and ranges of every setting, before any work
    check_force(cfg)
    for name in cfg.pipeline.stages:  # typos and conflicting settings fail before any work
        if (check := get_stage(str(name)).check) is not None:
            check(cfg)
    instances, required = plan(cfg)
    for instance in instances:  # the RL variants' settings too
        if instance.variant is not None and instance.stage.check is not None:
            instance.stage.check(instance.cfg)
    store = ArtifactStore(cfg.paths.artifact_dir, verify=str(cfg.pipeline.get("verify", "sha256")))
    if cfg.pipeline.get("plan", False):
        print(plan_table(instances, required, store), flush=True)
        return {}
    follower = is_follower()
    artifacts: dict[str, Artifact] = {}  # instance id -> finished artifact
    for needed_id, needed in required.items():
        artifacts[needed_id] = wait_for(store, needed) if follower else _require(store, needed)
    summary = []
    if follower:
        log.info("Follower process of a multi-device run: joining training, writing nothing.")
    isolate = stage_processes and isolated_stages(cfg)
    if isolate:
        preload_stage_modules()
    for instance in instances:
        start, start_memory = time.perf_counter(), rss_gb()
        if follower:
            artifact, built = follow(instance, store, artifacts), False
            peak = process_peak_gb()
        elif isolate:  # the stage in its own process: its memory all goes back when it ends
            (artifact, built), peak = in_child_process(
                lambda instance=instance: ensure_artifact(instance, store, artifacts)
            )
        else:
            artifact, built = ensure_artifact(instance, store, artifacts)
            peak = process_peak_gb()
        artifacts[instance.id] = artifact
        summary.append(
            {
                "stage": instance.label,
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
        log.info("%s %s: %s", instance.label, "built" if built else "reused", artifact.path)
    own = {i.stage.name: artifacts[i.id] for i in instances if i.listed}
    output_dir = _hydra_output_dir()
    if output_dir is not None and not follower:
        write_json_atomic(Path(output_dir) / "pipeline_summary.json", summary)
        if rows := _run_rows(own, replicate_id(cfg)):
            write_rows(Path(output_dir) / "results.csv", rows)
            _publish(cfg, Path(output_dir), rows, _calibration_rows(own))
    if summary and not follower:
        print(summary_table(summary, cfg, output_dir), flush=True)
    return own


def preload_stage_modules() -> None:
    """Import what the stages use lazily once, here, so each forked stage process inherits it
    instead of importing it again (imports start no torch threads)."""
    for module in ("transformers.models.llama.modeling_llama",):
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
        records = [r | {"model": cfg.model.name} for r in calibration]
        write_csv(target.with_name(f"{name}_hhh_calibration.csv"), records, list(records[0]))
    if cfg.pipeline.get("figures", True):
        written = make_figures(cfg.paths.results_dir, cfg.paths.figures_dir)
        log.info("Figures from %s: %s", cfg.paths.results_dir, Path(written[0]).parent)


def _stamp_rows(path: Path, key: str, seed: int | None) -> None:
    """Result rows name the artifact that measured them (`run_id`) and its seed."""
    if path.is_file():
        stamped = [
            {**r, "run_id": r["run_id"] or key, "seed": r["seed"] or ("" if seed is None else seed)}
            for r in read_rows(path)
        ]
        write_rows(path, stamped)


def _calibration_rows(artifacts: dict[str, Artifact]) -> list[dict]:
    """The eval_hhh stage's reliability table of this run ([] without one)."""
    artifact = artifacts.get("eval_hhh")
    path = artifact.path / "calibration.csv" if artifact else None
    if path is None or not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _run_rows(artifacts: dict[str, Artifact], replicate: str) -> list[dict]:
    """The result rows of every stage of this run (results.csv beside the run's logs), each
    with the seed its artifact was built with and the run's replicate id."""
    return [
        r | {"seed": r["seed"] or artifact.manifest.get("seed", ""), "replicate": replicate}
        for artifact in artifacts.values()
        if (artifact.path / "rows.csv").is_file()
        for r in read_rows(artifact.path / "rows.csv")
    ]


def replicate_id(cfg: DictConfig) -> str:
    """A hash of the run's config less its seed (and less where outputs go and how the run is
    shown: paths, logger, pipeline switches): runs with one id are replicates, differing in their
    seed alone, and their rows are pooled over seeds (cai.analysis.pooling)."""
    tree = OmegaConf.to_container(cfg, resolve=True)
    for key in ("seed", "paths", "logger", "pipeline", "hydra"):
        tree.pop(key, None)
    return hash_payload(tree, 12)


def forced(instance: Instance) -> bool:
    """Whether `pipeline.force` asks to rebuild this instance: true (every listed stage) or a
    list of stage names (the run's own instances of those stages)."""
    force = instance.cfg.pipeline.force
    if not instance.listed:
        return False
    if isinstance(force, bool):
        return force
    return instance.stage.name in [str(f) for f in (force or [])]


def ensure_artifact(
    instance: Instance, store: ArtifactStore, finished: dict[str, Artifact]
) -> tuple[Artifact, bool]:
    """The instance's finished artifact, built if needed; and whether it was built.
    `finished`: instance id -> artifact, for every instance before it in the plan."""
    stage, key, force = instance.stage, instance.key, forced(instance)
    name = stage.name
    if not force and (done := store.get(name, key)) is not None:
        return done, False
    inputs = {input_name: finished[i] for input_name, i in instance.inputs.items()}
    with store.lock(name, key):
        if not force and (done := store.get(name, key)) is not None:
            return done, False  # a sibling job finished it while we waited for the lock
        work_dir = store.start(name, key, fresh=force)
        log.info("Building %s (key %s) in %s", instance.label, key, work_dir)
        started = time.time()
        try:
            metrics = stage.run(instance.cfg, inputs, work_dir) or {}
        except Exception as error:
            if (storage := _storage_error(name, work_dir, error)) is None:
                raise
            raise storage from error
        inputs_of_key = stage_inputs(instance.cfg, name)
        _stamp_rows(work_dir / "rows.csv", key, inputs_of_key["seed"])
        manifest = {
            **inputs_of_key,
            "metrics": metrics,
            "timings": {
                "started": started,
                "finished": time.time(),
                "wall_s": round(time.time() - started, 3),
            },
            "versions": _versions(),
            "machine": machine(),  # what can still move bytes within one key
        }
        return store.finish(name, key, manifest), True


def follow(instance: Instance, store: ArtifactStore, finished: dict[str, Artifact]) -> Artifact:
    """What a follower process (a second device's process, `is_follower()`) does for an
    instance: take part in its training (distributed stages: the same run function, which joins
    rank 0's fit and writes nothing), then wait for global rank 0 to finish the artifact. It
    never builds, locks or writes an artifact, so the processes of one run cannot contend."""
    stage, key = instance.stage, instance.key
    if not forced(instance) and (done := store.get(stage.name, key)) is not None:
        return done  # finished before this run: rank 0 reuses it too, no training to join
    if stage.distributed:
        inputs = {input_name: finished[i] for input_name, i in instance.inputs.items()}
        work_dir = store.work_folder(stage.name, key)
        work_dir.mkdir(parents=True, exist_ok=True)
        stage.run(instance.cfg, inputs, work_dir)
    return wait_for(store, instance)


def wait_for(store: ArtifactStore, instance: Instance) -> Artifact:
    """Block until global rank 0 has finished the instance's artifact."""
    name, key = instance.stage.name, instance.key
    deadline = time.time() + float(instance.cfg.pipeline.get("follower_timeout_s", 86400))
    while (artifact := store.get(name, key)) is None:
        if time.time() > deadline:
            raise ArtifactError(
                f"Waited pipeline.follower_timeout_s for global rank 0 to finish {name} ({key}) "
                f"in {store.root}; did the rank 0 process stop? See its log."
            )
        time.sleep(1.0)
    return artifact


def _require(store: ArtifactStore, needed: Instance) -> Artifact:
    """An upstream artifact the run reads but does not list: it must exist already."""
    name, key = needed.stage.name, needed.key
    artifact = store.get(name, key)
    if artifact is None:
        raise ArtifactError(
            f"Stage {needed.needed_by!r} needs the {name!r} artifact (key {key}), which is not "
            f"built for this config. Add {name} before {needed.needed_by} in pipeline.stages, "
            f"e.g. pipeline.stages=[{name},{needed.needed_by}]."
        )
    return artifact


def _storage_error(name: str, work_dir: Path, error: Exception) -> ArtifactError | None:
    """A full disk or an unwritable folder (an OSError, or safetensors' own error type): one
    message naming the path. None for any other error, which passes through unchanged."""
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


def _versions() -> dict[str, str]:
    return {
        "cai": cai.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _hydra_output_dir() -> str | None:
    """The run folder of the Hydra run this is part of; None outside one (tests, notebooks)."""
    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None


def run_from_config(cfg: DictConfig, stage_processes: bool = False) -> dict[str, Artifact]:
    """What the command line calls (cai.cli.train, with stage_processes=True): resolve model
    presets, log the plan, run the stages."""
    cfg = typed_config(resolve_model(cfg))
    stages = list(cfg.pipeline.stages)
    log.info("Model %s (%s), stages: %s", cfg.model.name, cfg.model.source, stages or "none")
    output_dir = _hydra_output_dir()
    if output_dir is not None:  # the config as run, model preset resolved
        write_text_atomic(Path(output_dir) / "config_resolved.yaml", OmegaConf.to_yaml(cfg))
    if not stages:
        log.warning("pipeline.stages is empty: nothing to run.")
    return run(cfg, stage_processes)
