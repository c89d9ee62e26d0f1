"""The layout's rules (ARCHITECTURE.md), read from the source: one stage file per conf/ group, no
import circle, lower layers never import a stage or the runner, no stage imports another, and
no import inside a function except one that keeps an optional dependency optional."""

import ast
from pathlib import Path

from cai.config import CONF_DIR
from cai.stages import STAGES

SRC = Path(__file__).resolve().parents[1] / "src"
OPTIONAL = {"peft", "vllm"}  # extras: imported only where they are used
GROUP_OF_STAGE = {"generate_sl": "sl", "generate_pairs": "pairs"}  # the paper's step names


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted((SRC / "cai").rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def imported(tree: ast.Module, known: set[str]) -> set[str]:
    """The cai modules a module imports (`from cai.x import y` counts cai.x.y when it is one)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cai"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names} & known
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("cai")}
    return out & known


def test_every_stage_has_its_file_and_config_group():
    for name, stage in STAGES.items():
        assert (SRC / "cai" / "stages" / f"{name}.py").is_file()
        assert stage.run.__module__ == f"cai.stages.{name}"  # its logic lives in its file
        assert (CONF_DIR / GROUP_OF_STAGE.get(name, name) / "default.yaml").is_file()


def test_no_import_circle_and_layers_import_downwards():
    trees = modules()
    graph = {name: imported(tree, set(trees)) - {name, "cai"} for name, tree in trees.items()}
    top = ("cai.pipeline", "cai.cli", "cai.stages")
    for name, deps in graph.items():
        if not name.startswith(top):  # a lower layer
            assert not {d for d in deps if d.startswith(top)}, name
        if name.startswith("cai.stages.") and name != "cai.stages.base":
            others = {d for d in deps if d.startswith("cai.stages.") and d != "cai.stages.base"}
            assert not others, f"{name} imports another stage: {others}"
    # no circle: every module can be ordered after everything it imports
    done: set[str] = set()
    while len(done) < len(graph):
        ready = {n for n, deps in graph.items() if n not in done and deps <= done}
        assert ready, f"import circle among {sorted(set(graph) - done)}"
        done |= ready


def test_imports_inside_functions_only_keep_optional_dependencies_optional():
    for name, tree in modules().items():
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    roots = {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom):
                    roots = {(node.module or "").split(".")[0]}
                else:
                    continue
                assert roots <= OPTIONAL, f"{name}.{function.name} imports {roots} locally"
