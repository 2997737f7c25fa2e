"""Where longreach keeps converted models: ``$LONGREACH_HOME`` (default ``~/.cache/longreach``)."""

from __future__ import annotations

import os
from pathlib import Path


def longreach_home() -> Path:
    return Path(
        os.environ.get("LONGREACH_HOME") or Path.home() / ".cache" / "longreach"
    ).expanduser()


def models_dir() -> Path:
    return longreach_home() / "models"
