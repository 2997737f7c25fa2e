"""M4LE's conversion of short instances into long ones (Kwan et al., 2023, "M4LE: A
Multi-Ability Multi-Range Multi-Task Multi-Domain Long-Context Evaluation Benchmark").

Short instances (JSON lines ``{"context", "input", "answers", "label"?}``) are packed into long
inputs: each long row holds one target instance and as many others as fit the length, counted
in whitespace words as M4LE counts them. Four modes, after M4LE's abilities:

- ``explicit-single``: "Article i: ..." each; the question names the target's article
  ("Based on article k, ..."). Answers: the target's.
- ``semantic-single``: the same passages without ids; the question is the target's own, so the
  model must find the passage.
- ``explicit-multi``: "The article id XXXXXX. ..." (six hex digits) each; the question asks
  for the ids of all articles with the target's ``label``. Answers: those ids (scored as the
  share named).
- ``semantic-multi``: passages without ids; the question asks how many articles have the
  target's ``label``. Answer: the count.

The output is a task file (``--task-file``): single modes write LongBench rows (``context``,
``input``, ``answers``: token F1), multi modes RULER rows (``input``, ``outputs``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from longreach.errors import LongreachError

MODES = ("explicit-single", "explicit-multi", "semantic-single", "semantic-multi")


def read_short(path: str | Path, mode: str) -> list[dict[str, Any]]:
    """The short instances of ``path``; a malformed file is a one-line error."""
    p = Path(path).expanduser()
    try:
        text = p.read_text("utf-8", errors="replace")
    except OSError as exc:
        raise LongreachError(f"cannot read {p} ({exc.strerror or exc}); check the path.") from None
    need = ("context", "input", "answers") if mode.endswith("single") else ("context", "label")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise LongreachError(
                f"{p} line {number} is not JSON; write one object per line."
            ) from None
        if not isinstance(row, dict):
            raise LongreachError(f"{p} line {number} is not a JSON object.")
        missing = [f for f in need if f not in row]
        if missing:
            raise LongreachError(
                f"{p} line {number} has no {', '.join(repr(f) for f in missing)}; mode {mode} "
                f"needs {', '.join(need)} in every row."
            )
        if not isinstance(row["context"], str) or not row["context"].strip():
            raise LongreachError(f"{p} line {number}: 'context' must be a non-empty string.")
        rows.append(row)
    if len(rows) < 2:
        raise LongreachError(
            f"{p} holds {len(rows)} instance{'s' if len(rows) != 1 else ''}; packing needs at "
            "least two."
        )
    return rows


def _words(text: str) -> int:
    return len(text.split())


def convert(
    rows: list[dict[str, Any]], lengths: list[int], mode: str, seed: int = 111, per_length: int = 0
) -> Iterator[dict[str, Any]]:
    """Long rows: for each length (in words), one row per target instance (``per_length`` caps them)."""
    if mode not in MODES:
        raise LongreachError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}.")
    for length in lengths:
        targets = list(range(len(rows)))
        if per_length:
            targets = targets[:per_length]
        for t in targets:
            rng = random.Random(f"m4le|{seed}|{length}|{t}")
            others = [i for i in range(len(rows)) if i != t]
            rng.shuffle(others)
            chosen, used = [t], _words(rows[t]["context"]) + 40
            for i in others:
                cost = _words(rows[i]["context"]) + 4
                if used + cost > length:
                    continue
                chosen.append(i)
                used += cost
            if len(chosen) < 2:
                raise LongreachError(
                    f"length {length} words holds only the target instance {t}; ask for a "
                    "longer length or give shorter instances."
                )
            rng.shuffle(chosen)
            yield _pack(rows, chosen, t, mode, rng, length)


def _pack(
    rows: list[dict[str, Any]],
    chosen: list[int],
    target: int,
    mode: str,
    rng: random.Random,
    length: int,
) -> dict[str, Any]:
    row = rows[target]
    meta = {"dataset": "", "m4le_mode": mode, "length_words": length, "instances": len(chosen)}
    if mode.endswith("single"):
        explicit = mode == "explicit-single"
        k = chosen.index(target) + 1
        context = "\n\n".join(
            (f"Article {j + 1}: " if explicit else "") + rows[i]["context"]
            for j, i in enumerate(chosen)
        )
        question = f"Based on article {k}, {row['input']}" if explicit else str(row["input"])
        answers = row["answers"] if isinstance(row["answers"], list) else [row["answers"]]
        return {"context": context, "input": question, "answers": [str(a) for a in answers], **meta}
    label = str(row["label"])
    if mode == "explicit-multi":
        ids = {i: f"{rng.getrandbits(24):06x}" for i in chosen}
        context = "\n\n".join(f"The article id {ids[i]}. {rows[i]['context']}" for i in chosen)
        wanted = [ids[i] for i in chosen if str(rows[i]["label"]) == label]
        question = (
            f"Provide me the article id of all the news articles related to '{label}'. "
            "Separate the ids by commas."
        )
        outputs = wanted
    else:
        context = "\n\n".join(rows[i]["context"] for i in chosen)
        count = sum(1 for i in chosen if str(rows[i]["label"]) == label)
        question = f"How many of the articles above are related to '{label}'? Answer with a number."
        outputs = [str(count)]
    prompt = f"Read the following articles.\n\n{context}\n\n{question}"
    return {"input": prompt, "outputs": outputs, "answer_prefix": "Answer:", **meta}


def write_jsonl(rows: list[dict[str, Any]], out: str | Path) -> int:
    """Write the converted rows (all made before the file is opened, so an error leaves none)."""
    path = Path(out).expanduser()
    n = 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
    except OSError as exc:
        raise LongreachError(
            f"cannot write {path} ({exc.strerror or exc}); pass another --out."
        ) from None
    return n
