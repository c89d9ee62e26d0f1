"""The judge stage's artifact as the eval stage reads it: one PM judge per dimension
(harmlessness, helpfulness) and each judge's validation against the paper's PM."""

from __future__ import annotations

import json
import logging

from cai.artifacts import Artifact
from cai.preference import PreferenceModel

log = logging.getLogger(__name__)

DIMENSIONS = ("harmlessness", "helpfulness")


def judge_name(dimension: str) -> str:
    """The name result rows give a PM judge."""
    return f"pm_{dimension}"


def load_validation(artifact: Artifact) -> dict:
    """{judge name: validation summary} of a judge artifact ({} for older artifacts)."""
    path = artifact.path / "validation.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_judges(artifact: Artifact, device: str = "cpu") -> dict:
    """{dimension: PreferenceModel} of a judge artifact."""
    listed = json.loads(artifact.file("judges.json").read_text())
    return {
        d: PreferenceModel.load(artifact.path / folder, device=device)
        for d, folder in listed.items()
    }
