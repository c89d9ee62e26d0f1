"""Same key, same bytes: a stage run twice on the real embedded model gives identical files, and
what can make one key compute differently on another machine is in the key or in the cache's
name (README, "Determinism")."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.conftest import TINY_STAGES

# The embedded SmolLM2-135M at a small size: 2 red-team and 1 helpfulness prompt, one critique
# and revision round, short answers; then SL-CAI trained on them for a few steps
EMBEDDED_SMALL = [
    "model=smollm2_135m",
    "data.max_red_team=2",
    "data.max_helpful=1",
    "sl.generate_revisions=1",
    "sft.num_revisions=1",
    "sl.max_answer_tokens=12",
    "sl.max_critique_tokens=10",
    "sl.max_revision_tokens=12",
    "sft.batch_size=2",
    "sft.max_steps=2",
    "generation.progress=false",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "pipeline.figures=false",
    "pipeline.stages=[generate_sl,sft]",
]


def _file_hashes(folder) -> dict[str, str]:
    """sha256 of every file of an artifact; the manifest without its wall times and machine."""
    hashes = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "manifest.json":
            manifest = json.loads(data)
            manifest.pop("machine", None)
            data = json.dumps(_without_timings(manifest), sort_keys=True).encode()
        hashes[str(path.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return hashes


def _without_timings(tree):
    """A manifest less its clock readings (wall times, rates, start and finish times)."""
    if isinstance(tree, dict):
        return {
            k: _without_timings(v)
            for k, v in tree.items()
            if k != "timings" and not k.endswith(("_s", "per_s", "_sec"))
        }
    return tree


@pytest.mark.slow
def test_same_key_same_bytes_on_the_embedded_model(tmp_path):
    """generate_sl and sft built twice into two output folders: every file identical."""
    from cai.config import compose
    from cai.pipeline import run

    built = []
    for name in ("first", "second"):
        out = tmp_path / name
        cfg = compose([*EMBEDDED_SMALL, f"paths.output_dir={out}", f"paths.results_dir={out}/r"])
        built.append(run(cfg))
    first, second = built
    for stage in ("generate_sl", "sft"):
        assert first[stage].key == second[stage].key
        hashes = _file_hashes(first[stage].path)
        assert any(name.endswith((".jsonl", ".safetensors")) for name in hashes), hashes
        assert hashes == _file_hashes(second[stage].path), stage
    chains = (first["generate_sl"].path / "red_team.jsonl").read_text().splitlines()
    assert len(chains) == 2 and all(json.loads(line)["initial"] for line in chains)
    manifest = first["sft"].manifest
    assert manifest["machine"]["libraries"]["torch"].startswith("2.")
    assert "threads" in manifest["machine"] and "isa" in manifest["machine"]


def test_the_key_names_the_dtype_that_auto_resolves_to(make_cfg, monkeypatch):
    """A machine whose `auto` dtypes resolve to bfloat16 computes other bytes than one that
    resolves them to float32: the same config gets another key there."""
    import cai.stages.base as base
    from cai.pipeline import artifact_key

    cfg = make_cfg(*TINY_STAGES)
    here = {stage: artifact_key(cfg, stage) for stage in ("generate_sl", "sft", "judge")}
    flipped = {"bf16_auto": not base.numerics()["bf16_auto"], "cuda": False}
    monkeypatch.setattr(base, "numerics", lambda: flipped)
    there = {stage: artifact_key(cfg, stage) for stage in ("generate_sl", "sft", "judge")}
    assert all(here[s] != there[s] for s in here)


def test_model_cache_name_says_which_libraries_wrote_it(monkeypatch):
    """Dequantised by other library versions, the embedded model's cache has another name (a
    cache written by older code is never reused under the current one)."""
    import cai.models as models

    now = models._dequantiser_fingerprint()
    versions = models.library_versions()
    monkeypatch.setattr(models, "library_versions", lambda: versions | {"gguf": "0.0.1"})
    assert models._dequantiser_fingerprint() != now
    monkeypatch.setattr(models, "library_versions", lambda: versions | {"numpy": "0.0.1"})
    assert models._dequantiser_fingerprint() == now  # numpy does not write the cache


@pytest.mark.parametrize("name", ["transformers", "torch", "gguf", "safetensors"])
def test_libraries_that_compute_the_bytes_are_pinned(name):
    """constraints.txt pins each library that computes bytes (torch: scripts/setup.sh's own
    spec), and scripts/setup.sh installs with it."""
    from tests.conftest import REPO

    pins = (REPO / "constraints.txt").read_text().splitlines()
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "-c constraints.txt" in setup
    if name == "torch":
        assert "torch==2.13.0" in setup
    else:
        assert any(line.startswith(f"{name}==") for line in pins)
