"""Read the JSON files of a model directory with errors that say where.

A bad file raises `ModelLoadError` as ``path:line:col: invalid JSON: <what>``
(the location json.JSONDecodeError reports), or names the file that is not
UTF-8, not an object, or cannot be read; never a bare json traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dendrite.model.errors import MissingFileError, ModelLoadError

__all__ = ["read_json_object"]


def read_json_object(path: Path, *, optional: bool = False) -> dict[str, Any]:
    """The JSON object in `path`; `{}` when `optional` and the file is absent."""
    if not path.is_file():
        if optional and not path.exists():
            return {}
        if path.exists():
            raise ModelLoadError(f"{path} is not a regular file")
        raise MissingFileError(f"missing {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except RecursionError:
        raise ModelLoadError(f"{path}: invalid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
