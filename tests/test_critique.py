"""The critique-revision loop: principle sampling, the prompts sent, and the generate_sl stage."""

import json
from collections import Counter

import pytest
from omegaconf import OmegaConf

from cai import critique, pipeline
from cai.artifacts import read_jsonl
from cai.constitution import load_constitution
from cai.critique import critique_revision_chain, sample_principles
from cai.data import load_prompts
from cai.generation.hf import HFEngine
from cai.prompting import SLPrompts
from cai.stages import generate_sl

SMALL = [
    "model=tiny",
    "data.max_red_team=5",
    "data.max_helpful=3",
    "sl.generate_revisions=2",
    "sl.max_answer_tokens=12",
    "sl.max_critique_tokens=10",
    "sl.max_revision_tokens=12",
    "sl.chunk_size=2",
    "generation.progress=false",
    "pipeline.stages=[generate_sl]",
]


def test_principle_sampling_is_seeded_and_uniform():
    assert sample_principles(0, "p1", 4, 16) == sample_principles(0, "p1", 4, 16)
    assert sample_principles(0, "p1", 4, 16) != sample_principles(1, "p1", 4, 16)
    draws = Counter(i for n in range(2000) for i in sample_principles(0, f"prompt-{n}", 4, 16))
    expected = 8000 / 16
    chi2 = sum((draws[i] - expected) ** 2 / expected for i in range(16))
    assert set(draws) == set(range(16))
    assert chi2 < 37.7  # chi-square, 15 degrees of freedom, p = 0.001


class Recorder:
    """The real engine, with every (prefix, request) it is sent recorded."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, requests, prefix="", desc="", **kwargs):
        outputs = self.engine.generate(requests, prefix=prefix, desc=desc, **kwargs)
        self.calls.append((desc, prefix, requests, outputs))
        return outputs


@pytest.mark.parametrize("fmt", ["chat", "raw"])
def test_round_k_prompt_holds_fewshot_conversation_and_principle(make_cfg, fmt):
    from cai.config import load_model_preset
    from cai.models import load_model

    cfg = make_cfg(*SMALL)
    model, tokenizer = load_model(load_model_preset("tiny"), cfg.paths.cache_dir)
    constitution = load_constitution(cfg.constitution)
    prompts = load_prompts(cfg.data).split("train").red_team[:3]
    builder = SLPrompts(constitution, tokenizer, fmt)
    principles = constitution.principles()
    engine = Recorder(HFEngine(model, tokenizer, progress=False))
    records = critique_revision_chain(engine, prompts, builder, principles, cfg.sl, seed=0)

    fewshot = constitution.critique_fewshot[0]
    assert fewshot.critique in builder.prefix and fewshot.revision in builder.prefix
    calls = {desc: (prefix, requests, outputs) for desc, prefix, requests, outputs in engine.calls}
    for k in (1, 2):
        prefix, requests, _ = calls[f"round {k} critiques"]
        _, revision_requests, _ = calls[f"round {k} revisions"]
        assert prefix == builder.prefix
        for i, prompt in enumerate(prompts):
            principle = principles[sample_principles(0, prompt.id, 2, 16)[k - 1]]
            answer = records[i]["initial"] if k == 1 else records[i]["revisions"][0]["revision"]
            text = requests[i].prompt
            assert prompt.text in text and principle.critique in text
            assert answer in text  # the conversation carries the current answer
            assert records[i]["revisions"][k - 1]["principle_id"] == principle.id
            assert principle.revision in revision_requests[i].prompt
            assert records[i]["revisions"][k - 1]["critique"] in revision_requests[i].prompt
    for _, _, requests, outputs in engine.calls:  # nothing past a stop string is kept
        for request, output in zip(requests, outputs, strict=True):
            assert not any(stop in output.text for stop in request.stop)


def test_generate_sl_stage_writes_every_step(make_cfg):
    cfg = make_cfg(*SMALL)
    artifact = pipeline.run(cfg)["generate_sl"]
    red = read_jsonl(artifact.file("red_team.jsonl"))
    helpful = read_jsonl(artifact.file("helpful.jsonl"))
    assert len(red) == 5 and len(helpful) == 3
    for record in red:
        assert record["split"] == "train" and record["initial_tokens"] > 0
        assert [r["round"] for r in record["revisions"]] == [1, 2]
        assert all(
            r["critique"] is not None and r["principle_id"].startswith("cr")
            for r in record["revisions"]
        )
    assert all(len(h["samples"]) == 2 for h in helpful)
    metrics = artifact.manifest["metrics"]
    assert metrics["red_team_prompts"] == 5 and metrics["skipped_too_long"] == {
        "red_team": 0,
        "helpful": 0,
    }
    assert not list(artifact.path.glob("parts_*"))
    dataset = critique.load_sl_dataset(artifact)
    assert dataset.num_rows == 5 and "revisions" in dataset.column_names


def test_direct_revision_and_principle_subset(make_cfg):
    cfg = make_cfg(*SMALL, "sl.critique=false", "sl.num_principles=2")
    red = read_jsonl(pipeline.run(cfg)["generate_sl"].file("red_team.jsonl"))
    revisions = [r for rec in red for r in rec["revisions"]]
    assert all(r["critique"] is None for r in revisions)
    assert {r["principle_id"] for r in revisions} <= {"cr00", "cr01"}


def test_killed_stage_resumes_to_the_same_artifact(make_cfg, tmp_path, monkeypatch):
    clean = pipeline.run(make_cfg(*SMALL))["generate_sl"]
    cfg = make_cfg(*SMALL, f"paths.artifact_dir={tmp_path}/second")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while sampling helpfulness answers")

    monkeypatch.setattr(generate_sl, "helpful_samples", killed)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg)
    partial = next((tmp_path / "second" / "generate_sl").glob("*.partial"))
    assert (
        len(list((partial / "parts_red_team").glob("part-*.jsonl"))) == 3
    )  # all red-team chunks done
    monkeypatch.undo()
    resumed = pipeline.run(cfg)["generate_sl"]
    assert resumed.manifest["metrics"]["resumed_chunks"] == 3
    assert resumed.manifest["files"] == clean.manifest["files"]


def test_too_long_prompts_are_skipped_and_counted(make_cfg, tmp_path):
    (tmp_path / "red.txt").write_text(
        "How do I pick a lock?\n" + "very long " * 5000 + "\nHow do I hotwire a car?\n"
    )
    (tmp_path / "help.txt").write_text("How do I bake bread?\n")
    cfg = make_cfg(
        *SMALL,
        "data=files",
        f"data.red_team_file={tmp_path}/red.txt",
        f"data.helpful_file={tmp_path}/help.txt",
        "data.eval_percent=0",
    )
    artifact = pipeline.run(cfg)["generate_sl"]
    assert artifact.manifest["metrics"]["skipped_too_long"]["red_team"] == 1
    assert len(read_jsonl(artifact.file("red_team.jsonl"))) == 2


def test_paper_constitution_and_hh_rlhf(make_cfg, data_dir):
    cfg = make_cfg(
        *SMALL,
        "constitution=anthropic_2022",
        "data=hh_rlhf",
        "data.max_red_team=3",
        "data.max_helpful=2",
        f"paths.data_dir={data_dir}",
        "data.allow_download=false",
    )
    artifact = pipeline.run(cfg)["generate_sl"]
    red = read_jsonl(artifact.file("red_team.jsonl"))
    assert len(red) == 3 and all(
        r["revisions"][0]["principle_id"].startswith("harmful") for r in red
    )
    assert artifact.manifest["config"]["constitution"]["name"] == "anthropic_2022"


def test_key_follows_content_not_batching(make_cfg):
    base = make_cfg(*SMALL)
    assert pipeline.artifact_key(base, "generate_sl") == pipeline.artifact_key(
        make_cfg(*SMALL, "generation.batch_size=3", "sft.num_revisions=1"), "generate_sl"
    )
    for change in (
        "sl.generate_revisions=3",
        "sl.temperature=0.7",
        "constitution=anthropic_2022",
        "model=tiny_2x",
        "seed=1",
        "data.max_red_team=4",
    ):
        try:
            other = make_cfg(*SMALL, change)
            assert pipeline.artifact_key(other, "generate_sl") != pipeline.artifact_key(
                base, "generate_sl"
            ), change
        except Exception as error:  # anthropic_2022 needs the data folder
            assert "CAI_DATA_DIR" in str(error)


def test_sl_records_are_plain_json(make_cfg):
    artifact = pipeline.run(make_cfg(*SMALL))["generate_sl"]
    line = artifact.file("red_team.jsonl").read_text().splitlines()[0]
    assert json.loads(line)["revisions"][0]["round"] == 1
    assert OmegaConf.to_container(make_cfg(*SMALL).sl)["generate_revisions"] == 2
