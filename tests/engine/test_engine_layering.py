"""The engine talks to the model side through `ModelRunner` alone: it imports
nothing from `dendrite.model` but the runner (and its step plan), and never
touches the runner's KV pool, backend or CUDA graphs."""

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "dendrite" / "engine.py"


def test_engine_imports_only_the_runner_from_the_model_package():
    tree = ast.parse(ENGINE.read_text())
    model_imports = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dendrite.model"):
            model_imports |= {(node.module, a.name) for a in node.names}
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("dendrite.model") for a in node.names)
    assert model_imports == {("dendrite.model.runner", "ModelRunner"),
                             ("dendrite.model.runner", "StepPlan")}


def test_engine_uses_no_runner_internals():
    tree = ast.parse(ENGINE.read_text())
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "runner"}
    assert not used & {"kv_cache", "backend", "graphs", "model", "run", "build_metadata"}, used
