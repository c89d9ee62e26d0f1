"""The package installed (not editable) outside the checkout runs: `pip install .` into a fresh
virtual environment, then `cai-train experiment=smoke` from another folder (conf/ ships inside
the package). Slow (a wheel build and a smoke run: about two minutes); .ci/run runs it."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    """pyproject.toml lists the packages by hand (conf/ is mapped in): a new folder of modules
    must be added there or an installed copy lacks it."""
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(REPO / "src").parts)
        for p in (REPO / "src" / "cai").rglob("__init__.py")
    }
    assert found | {"cai.conf"} == listed


@pytest.mark.slow
def test_installed_package_runs_the_smoke_experiment_outside_the_checkout(tmp_path, data_dir):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # the dependencies (torch, transformers, ...) from this environment, read-only, after the
    # new environment's own packages; its editable install of the project is not processed
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # the build backend from there too (a venv's bundled setuptools may be too old to build)
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=False)
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(REPO)],
        check=True, cwd=tmp_path,
    )  # fmt: skip
    where = subprocess.run(
        [python, "-c", "import cai, cai.config as c; print(cai.__file__); print(c.CONF_DIR)"],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    ).stdout.split()  # fmt: skip
    assert all(Path(w).is_relative_to(venv) for w in where), where  # not the checkout's
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CAI_ROOT"}  # as a user's shell: no checkout
    run = subprocess.run(
        [venv / "bin" / "cai-train", "experiment=smoke", f"paths.data_dir={data_dir}",
         f"paths.cache_dir={tmp_path / 'cache'}"],
        cwd=work, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    for stage in ("generate_sl", "sft", "pm", "ppo", "eval"):
        assert any((work / "outputs" / "artifacts" / stage).glob("*/manifest.json")), stage
    assert list((work / "results" / "runs").glob("runs_*.csv"))
    assert (work / "paper_figures").is_dir()
    assert list((work / "outputs" / "runs").glob("*/*/train.log"))
    figures = subprocess.run(
        [venv / "bin" / "cai-figures"], cwd=work, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert figures.returncode == 0, figures.stderr[-3000:]
