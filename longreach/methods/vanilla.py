"""The unmodified model, as a method, so that benchmarks and reports treat it like the others."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from longreach.methods.base import Method, Patch
from longreach.methods.registry import register


@register
@dataclasses.dataclass
class Vanilla(Method):
    """No change: the model as trained. The baseline every method is measured against."""

    name: ClassVar[str] = "vanilla"
    paper: ClassVar[str] = "-"
    summary: ClassVar[str] = "the unmodified model (baseline)"

    def install(self, model: torch.nn.Module, patch: Patch) -> None:
        return None
