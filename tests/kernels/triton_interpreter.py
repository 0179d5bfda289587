"""Running a kernel test script under Triton's CPU interpreter.

The interpreter needs TRITON_INTERPRET=1 before Triton builds its kernels, so
each interpreted test runs its script in a subprocess; the script starts with
`NUMPY2_PATCH`, which makes Triton 3.6's interpreter accept numpy 2 (it turns
loop bounds into ints with int() of a one-element array, which numpy 2
refuses).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

NUMPY2_PATCH = r'''
import triton.runtime.interpreter as interp

_patch = interp._patch_lang_tensor
def _patched(tensor, scope):
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
interp._patch_lang_tensor = _patched
'''

_HERE = Path(__file__).resolve().parent


def run_interpreted(script: str, timeout: float) -> subprocess.CompletedProcess:
    """`NUMPY2_PATCH` + `script` in a fresh interpreter with TRITON_INTERPRET=1 and
    this directory and the repository root on its path (for the shared case
    builders and the package)."""
    path = [str(_HERE), str(_HERE.parents[1]), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(path))
    return subprocess.run([sys.executable, "-c", NUMPY2_PATCH + script], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
