"""The top-level package: its names load lazily and all resolve."""

from __future__ import annotations

import subprocess
import sys

import dendrite

HEAVY = ("torch", "numpy", "dendrite._native", "dendrite.kv", "dendrite.engine", "dendrite.program")


def _loaded_after(code: str) -> list[str]:
    """Which HEAVY modules a fresh interpreter has loaded after running `code`."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_import_dendrite_loads_neither_torch_nor_the_native_core():
    assert _loaded_after("import dendrite") == []


def test_dendrite_help_loads_neither_torch_nor_the_native_core():
    code = ("import contextlib, io\nfrom dendrite.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as f:\n"
            "    assert main(['--help']) == 0\nassert 'usage: dendrite' in f.getvalue()\n"
            "for cmd in ('generate', 'run', 'demo'):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        assert main([cmd, '--help']) == 0\n")
    loaded = _loaded_after(code)
    assert "torch" not in loaded and "dendrite._native" not in loaded, loaded


def test_a_name_loads_only_what_it_needs():
    assert _loaded_after("import dendrite\ndendrite.load_script") == []
    assert _loaded_after("import dendrite\ndendrite.KVTree") == ["numpy", "dendrite._native",
                                                                  "dendrite.kv"]


def test_every_public_name_resolves():
    assert dendrite.__all__, "dendrite.__all__ is empty"
    for name in dendrite.__all__:
        assert getattr(dendrite, name) is not None, name
    assert set(dendrite.__all__) <= set(dir(dendrite))
    assert dendrite.Engine.__module__ == "dendrite.engine"
    assert dendrite.program.program.__module__ == "dendrite.program.program"


def test_an_unknown_name_is_a_clear_attribute_error():
    try:
        dendrite.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "module 'dendrite' has no attribute 'no_such_name'" in str(e)
    else:
        raise AssertionError("dendrite.no_such_name resolved")
