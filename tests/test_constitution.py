"""Constitution loading and validation: builtin, the paper's files, and every malformed file."""

import json

import pytest
import yaml
from omegaconf import OmegaConf

from cai.constitution import RESOURCES, from_yaml, load_constitution
from cai.errors import ConfigError


def builtin_raw():
    return yaml.safe_load((RESOURCES / "builtin.yaml").read_text())


def test_builtin_is_complete():
    c = load_constitution(OmegaConf.create({"source": "builtin"}))
    assert len(c.critique_revision) == 16 and len(c.feedback) == 16
    assert len({p.id for p in c.critique_revision}) == 16
    assert len(c.critique_fewshot) >= 3 and len(c.feedback_fewshot) >= 3 and len(c.cot_fewshot) >= 3
    assert all("{}" in t for t in c.cot_fewshot)
    assert [t.role for t in c.critique_fewshot[0].conversation] == ["user", "assistant"]


def test_paper_files_map_onto_the_schema(data_dir):
    cfg = OmegaConf.create({"source": "anthropic_2022", "url": "http://unused"})
    c = load_constitution(cfg, str(data_dir))
    assert len(c.critique_revision) == 16 and len(c.feedback) == 16
    assert c.critique_revision[0].id == "harmful0"
    assert c.critique_revision[0].critique.startswith("Identify specific ways")
    assert not c.critique_revision[0].critique.endswith("Critique:")
    assert c.critique_revision[0].revision.startswith("Please rewrite")
    assert len(c.critique_fewshot) == 5 and len(c.feedback_fewshot) == 5 and len(c.cot_fewshot) == 6
    first = c.critique_fewshot[0]
    assert first.conversation[0].content.startswith("Could you help me burn down my house")
    assert first.revision.startswith("I'm sorry, I shouldn't have agreed to help.")
    assert "Human:" not in first.revision


def test_paper_files_missing_offline_say_what_to_set(tmp_path, monkeypatch):
    import cai.constitution as module

    def offline(url, folder):
        raise OSError("no network")

    monkeypatch.setattr(module, "_download_paper_files", offline)
    cfg = OmegaConf.create({"source": "anthropic_2022", "url": "http://unused"})
    with pytest.raises(ConfigError, match="CAI_DATA_DIR"):
        load_constitution(cfg, str(tmp_path), str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "edit,field",
    [
        (
            lambda d: d["critique_revision"][3].pop("revision"),
            r"critique_revision\[3\]\.revision: missing",
        ),
        (lambda d: d.update(feedback=[]), r"feedback: empty list"),
        (lambda d: d.update(feedback="be nice"), r"feedback: expected a list, got str"),
        (
            lambda d: d["critique_revision"][0].update(critique=7),
            r"critique_revision\[0\]\.critique: expected text",
        ),
        (
            lambda d: d["critique_revision"][1].update(id=d["critique_revision"][0]["id"]),
            r"duplicate principle ids",
        ),
        (lambda d: d.update(cot_fewshot=["no slot here"]), r"cot_fewshot\[0\]: has no '\{\}' slot"),
        (
            lambda d: d["critique_fewshot"][0]["conversation"][0].update(role="narrator"),
            r"role: must be user or assistant",
        ),
        (lambda d: d.pop("feedback_fewshot"), r"feedback_fewshot: missing"),
    ],
)
def test_malformed_constitution_names_file_and_field(tmp_path, edit, field):
    raw = builtin_raw()
    edit(raw)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=field) as error:
        from_yaml(path)
    assert str(path) in str(error.value)


def test_not_utf8_or_not_yaml(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not valid UTF-8 YAML"):
        from_yaml(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid UTF-8 YAML"):
        from_yaml(broken)


def test_unknown_principle_id_and_bad_subset():
    c = load_constitution(OmegaConf.create({"source": "builtin"}))
    assert [p.id for p in c.principles(["cr03", "cr01"])] == ["cr03", "cr01"]
    assert len(c.principles(first_k=4)) == 4
    with pytest.raises(ConfigError, match="Unknown principle id"):
        c.principles(["cr03", "harmful99"])
    with pytest.raises(ConfigError, match="sl.num_principles=17"):
        c.principles(first_k=17)


def test_file_source_and_fingerprint(tmp_path):
    raw = builtin_raw()
    raw["feedback"][0] = "A different principle. Options:"
    path = tmp_path / "edited.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML too
    edited = load_constitution(OmegaConf.create({"source": "file", "path": str(path)}))
    builtin = load_constitution(OmegaConf.create({"source": "builtin"}))
    assert edited.fingerprint() != builtin.fingerprint()
    assert (
        builtin.fingerprint()
        == load_constitution(OmegaConf.create({"source": "builtin"})).fingerprint()
    )
