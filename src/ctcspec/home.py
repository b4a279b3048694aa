"""Where ctcspec keeps what it makes once per machine: exported models, cost curves, kernel choices and builds."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def ctcspec_home() -> Path:
    return Path(os.environ.get("CTCSPEC_HOME", Path.home() / ".cache" / "ctcspec"))


def write_cache_json(path: Path, value) -> None:
    """Write a cache file whole or not at all: two runs side by side never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        json.dump(value, tmp)
    os.replace(tmp.name, path)
