"""The README's two-line serve + curl example runs as printed (tiny model, a free port)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from conftest import free_port

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_serve_and_curl_example(tiny_model):
    section = README.read_text().split("## Serve", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()
    assert len(block) == 2
    serve, curl = block
    port = str(free_port())
    assert serve.endswith(" &") and "--port 8000" in serve and ":8000/" in curl
    argv = shlex.split(serve[:-2].replace("8000", port))
    assert argv[:2] == ["dendrite", "serve"]
    env = {**os.environ, "DENDRITE_MODEL": str(tiny_model), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "dendrite.cli", *argv[1:]], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        # Right after the server starts, as a user pastes it: the line itself waits.
        out = subprocess.run(["bash", "-c", curl.replace("8000", port)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        body = json.loads(out.stdout)
        assert body["object"] == "text_completion"
        assert body["usage"]["completion_tokens"] >= 1
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
