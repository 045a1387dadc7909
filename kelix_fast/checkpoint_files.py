"""Files of a local checkpoint directory: the directory check and its optional JSON files.

Shared by the text tokenizer (``tokenizer_config.json``, ``added_tokens.json``, ...) and the image
settings (``preprocessor_config.json``), which both read a checkpoint directory's optional files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["checkpoint_dir", "read_optional_json"]


def checkpoint_dir(op: str, path: str | os.PathLike[str]) -> Path:
    """``path`` as a directory; ValueError naming ``op`` when it is not one."""
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"{op}: path must be a checkpoint directory, got {os.fspath(path)!r}")
    return directory


def read_optional_json(file: Path) -> Any:
    """Parsed JSON of ``file``, or None when it does not exist."""
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} must be valid JSON: {exc}") from exc
