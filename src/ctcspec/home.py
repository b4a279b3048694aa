"""Where ctcspec keeps what it makes once per machine: exported models, cost curves, kernel choices and builds."""

from __future__ import annotations

import os
from pathlib import Path


def ctcspec_home() -> Path:
    return Path(os.environ.get("CTCSPEC_HOME", Path.home() / ".cache" / "ctcspec"))
