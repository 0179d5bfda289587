"""`KernelConfig`: the environment sets its defaults only, in one module; the
runner holds one and passes it down, and the engine's sampler reads it."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from dendrite.kernels.config import ENV_VARS, KernelConfig

PACKAGE = Path(__file__).resolve().parents[2] / "dendrite"

#: DENDRITE_* variables read outside kernels/config.py, and where (see its docstring).
OTHER_VARIABLES = {
    "DENDRITE_MODEL": {"engine.py"},
    "DENDRITE_CACHE": {"default_model.py"},
    "DENDRITE_GRAMMAR_THREADS": {"grammar/masks.py"},
}


def test_from_env_sets_the_defaults_only():
    assert KernelConfig.from_env({}) == KernelConfig()
    off = KernelConfig.from_env({"DENDRITE_GEMV": "0", "DENDRITE_FUSED_SAMPLING": "false"})
    assert off == KernelConfig(gemv=False, fused_sampling=False)
    assert KernelConfig.from_env({var: "0" for var in ENV_VARS.values()}) == \
        KernelConfig.torch_only()
    assert KernelConfig.from_env({"DENDRITE_SKINNY": "1", "DENDRITE_TREE_ATTENTION": ""}) == \
        KernelConfig()
    assert set(ENV_VARS) == {f.name for f in dataclasses.fields(KernelConfig)}


def test_from_env_reads_the_environment_when_called(monkeypatch):
    monkeypatch.setenv("DENDRITE_FUSED_ROWS", "0")
    assert KernelConfig.from_env() == KernelConfig(fused_rows=False)
    monkeypatch.delenv("DENDRITE_FUSED_ROWS")
    assert KernelConfig.from_env() == KernelConfig()  # no value cached from the last call


def test_bad_values_name_the_variable_or_field():
    with pytest.raises(ValueError, match="DENDRITE_GEMV must be 0 or 1, got 'maybe'"):
        KernelConfig.from_env({"DENDRITE_GEMV": "maybe"})
    with pytest.raises(TypeError, match="KernelConfig.skinny must be a bool"):
        KernelConfig(skinny=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        KernelConfig().gemv = False


def _env_reads(path: Path) -> set[str]:
    """DENDRITE_* string constants in a module (every read names one)."""
    tree = ast.parse(path.read_text(), str(path))
    return {n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and n.value.startswith("DENDRITE_") and n.value.isupper()}


def test_no_kernel_variable_is_read_outside_the_config_module():
    seen: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        for var in _env_reads(path):
            seen.setdefault(var, set()).add(rel)
    for var in ENV_VARS.values():
        assert seen.pop(var) == {"kernels/config.py"}, var
    for var, where in seen.items():
        assert var in OTHER_VARIABLES and where <= OTHER_VARIABLES[var], (var, where)
    text = (PACKAGE / "kernels" / "config.py").read_text()
    for var in OTHER_VARIABLES:  # listed in the config module's docstring
        assert var in text


def test_triton_probe_compiles_fullgraph():
    """Layers ask `triton_available()` inside torch.compile(fullgraph=True) regions
    (kernels.linear): the probe must be a constant to Dynamo, not a trace into
    importlib (test_gemv's compile test broke on the H100 that way)."""
    import torch

    from dendrite.kernels import config

    @torch.compile(fullgraph=True, dynamic=False, backend="eager")
    def f(x):
        return x * 2 if config.triton_available() else x * 3

    expected = 2 if config.triton_available() else 3
    assert torch.equal(f(torch.ones(2)), torch.full((2,), float(expected)))
