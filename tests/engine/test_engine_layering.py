"""The engine talks to the model side through `ModelRunner` alone: it never
touches the runner's KV pool, backend or CUDA graphs. (That it imports nothing
from `dendrite.model` but the runner and its step plan is checked with the
layer order in tests/test_layering.py.)"""

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "dendrite" / "engine.py"


def test_engine_uses_no_runner_internals():
    tree = ast.parse(ENGINE.read_text())
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "runner"}
    assert not used & {"kv_cache", "backend", "graphs", "model", "run", "build_metadata"}, used
