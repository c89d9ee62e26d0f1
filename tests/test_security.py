"""Security: no code from a model folder runs unless the user asks; weights load only from
safetensors; no pickle loading of files this project did not write."""

import re
from pathlib import Path

import pytest
from conftest import REPO


def test_every_model_preset_keeps_remote_code_off():
    from cai.config import available_models, load_model_preset

    for name in available_models():
        assert load_model_preset(name).get("trust_remote_code") is False, name


def test_loading_passes_remote_code_off_and_safetensors_only(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from cai.config import compose
    from cai.models import load_model

    cfg = compose(["model=tiny"])
    model, tokenizer = load_model(cfg.model, cfg.paths.cache_dir)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    seen = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(folder, **kwargs):
        seen.update(kwargs)
        return original(folder, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model(compose(["model=tiny", f"model.path={tmp_path}"]).model, cfg.paths.cache_dir)
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True


def test_no_pickle_loading_in_the_package():
    """Weights and data are read with safetensors, JSON and YAML (safe_load) only; Lightning
    reads back only the checkpoints this project wrote itself."""
    pattern = re.compile(
        r"pickle|torch\.load|weights_only\s*=\s*False|yaml\.load\(|trust_remote_code=True"
    )
    for path in sorted((REPO / "src").rglob("*.py")):
        if path == REPO / "src" / "cai" / "memory.py":  # the one exception: a stage process's
            # answer through an os.pipe from this process's own fork (never a file), checked
            # below to stay that
            text = path.read_text()
            assert "pickle.load(" not in text and text.count("pickle.loads(") == 1
            assert "data = answer_pipe.read()" in text  # what it loads: the child's pipe
            continue
        code = [line.split("#")[0] for line in path.read_text().splitlines()]
        hits = [line for line in code if pattern.search(line)]
        assert not hits, (path, hits)
    assert not list(Path(REPO / "src").rglob("*.pkl"))


def test_yaml_files_never_build_python_objects():
    import yaml

    from cai.constitution import safe_yaml

    assert safe_yaml("a: [1, 2]") == {"a": [1, 2]}
    with pytest.raises(yaml.YAMLError):
        safe_yaml("!!python/object/apply:os.system ['echo hi']")
