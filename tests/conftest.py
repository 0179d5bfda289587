"""Test-wide setup: tests are grouped by the module they test; CUDA tests carry
the `gpu` marker (and a skipif, so a CPU machine skips them cleanly).

`gpu_helpers` (shared by the CUDA tests of several modules) lives beside this
file; pytest's default import mode puts only a test file's own directory on
sys.path, so this directory is added here.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
