"""The lab model: a small Llama trained in this project at a 256-token context.

``CHECKPOINT_DIR`` is the committed model directory (``longreach.load("lab")``);
``longreach.lab.train`` is the recipe that produced it (``longreach train`` or
``python -m longreach.lab``), with Dataset Decomposition in ``decomposition``.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
TRAINED_LENGTH = 256

__all__ = ["CHECKPOINT_DIR", "TRAINED_LENGTH"]
