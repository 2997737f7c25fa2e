"""RULER's 13 synthetic tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"), generated with the model's own tokenizer.

Each task keeps RULER's parameters, prompt template and answer prefix, its sizing and its scorer:

- **sizing**: the haystack (filler lines, essay tokens, distractor needles, words or documents)
  is the largest whose prompt plus the task's tokens to generate fits the length:
  ``len(prompt tokens) + max_new_tokens <= length`` (RULER's ``max_seq_length`` includes the
  generated tokens). A length too short for the prompt without any haystack is an error.
- **scorers**: ``string_match_all`` (the share of references found in the output, case
  insensitive) for the needle, vt, cwe and fwe tasks; ``string_match_part`` (1 if any reference
  is found) for qa. Both only grow as the output grows, so greedy decoding stops as soon as the
  score is 1: the score equals that of the full generation.

The needle tasks hide "One of the special magic {values} for {key} is: {value}." in one of
three haystacks: ``noise`` (the sentence "The grass is green. ..." repeated, one per line),
``essay`` (the Paul Graham essays, or ``haystack=`` any text; needles at sentence boundaries at
depths drawn from RULER's 40 depths 0..100 %) and ``needle`` (distractor needles with other keys).
Keys and values are 7-digit numbers, ``adjective-noun`` words or uuid4s.

| task | haystack | keys | values | needles (keys × values) | questions |
| --- | --- | --- | --- | --- | --- |
| niah_single_1 | noise | words | numbers | 1 × 1 | 1 |
| niah_single_2 | essay | words | numbers | 1 × 1 | 1 |
| niah_single_3 | essay | words | uuids | 1 × 1 | 1 |
| niah_multikey_1 | essay | words | numbers | 4 × 1 | 1 |
| niah_multikey_2 | needle | words | numbers | 1 × 1 | 1 |
| niah_multikey_3 | needle | uuids | uuids | 1 × 1 | 1 |
| niah_multivalue | essay | words | numbers | 1 × 4 | 1 |
| niah_multiquery | essay | words | numbers | 4 × 1 | 4 |

The others: ``vt`` (variable tracking: ``chains`` chains of ``hops`` assignments in noise, after
one solved example), ``cwe`` (the ``num_cw`` most common words of a numbered list, after one
solved example), ``fwe`` (the three most frequent coded words of a Zipf-distributed text),
``qa_1`` / ``qa_2`` (a question over its gold documents among distractors; SQuAD-like and
HotpotQA-like, read from a QA file: see ``longreach/tasks/data/README.md``).

Samples do not take a depth (RULER draws needle positions at random): the grid's depths are not
used, and every position comes from the sample's seed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from longreach.errors import LongreachError
from longreach.tasks.base import Parts, PromptFormat, Sample, Task, fit_to_length
from longreach.tasks.haystack import (
    SYNTHETIC_FILLER,
    HaystackTooShort,
    insert_needles,
    resolve_haystack,
    tokenized_haystack,
)
from longreach.tasks.scorers import string_match_all, string_match_part
from longreach.tasks.words import adj_noun, all_words

NOISE = SYNTHETIC_FILLER.strip()
# RULER's needle depths: 40 evenly spaced percentages 0..100, rounded (no value is a tie).
DEPTHS = tuple(round(i * 100 / 39) for i in range(40))
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
DATA = Path(__file__).parent / "data"


class SourceTooShort(HaystackTooShort):
    """A word list or QA file that cannot fill the length (fit_to_length treats it as a haystack)."""

    def __init__(self, what: str, available: int, needed: int, advice: str) -> None:
        self.source_key, self.available, self.needed = what, available, needed
        LongreachError.__init__(self, f"{what} holds only {available} {advice}")


def fit_ruler(
    task: Task,
    fmt: PromptFormat,
    length: int,
    build: Callable[[int], Parts],
    tokens_per_unit: float = 1.0,
) -> tuple[Parts, str, list[int]]:
    """The parts with the most haystack units whose prompt + ``max_new_tokens`` fits ``length``."""
    gen = task.max_new_tokens  # type: ignore[attr-defined]
    base = len(fmt.encode(fmt.render(build(0))))
    if base + gen > length:
        raise LongreachError(
            f"length {length} is too short for task {task.name!r}: its prompt without haystack "
            f"takes {base} tokens with this tokenizer and it generates up to {gen}; ask for at "
            f"least {base + gen} tokens."
        )
    short: list[SourceTooShort] = []

    def tracked(n: int) -> Parts:
        try:
            return build(n)
        except SourceTooShort as exc:
            short.append(exc)
            raise

    try:
        return fit_to_length(tracked, fmt, length - gen, task.spec(), tokens_per_unit)
    except HaystackTooShort:
        if short:  # fit_to_length re-raises a plain haystack error; keep the source's words
            raise LongreachError(str(short[-1])) from None
        raise


def _token_count(fmt: PromptFormat, text: str) -> int:
    return len(fmt.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _random_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":
        return adj_noun(rng)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _join_queries(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _insert_lines(lines: list[str], items: list[str], fractions: list[float]) -> list[str]:
    """``items[i]`` goes between the lines at fraction ``fractions[i]`` of them, in order."""
    out = list(lines)
    at = sorted(
        ((int(f * (len(lines) + 1)), i) for i, f in enumerate(fractions)), key=lambda p: p[0]
    )
    for shift, (pos, i) in enumerate(at):
        out.insert(min(pos, len(lines)) + shift, items[i])
    return out


class _RulerTask(Task):
    """What every RULER task shares: no depth, the scorer, stopping once the score is 1."""

    uses_depth: ClassVar[bool] = False
    max_new_tokens: ClassVar[int] = 128
    scorer: ClassVar[Callable[[str, list[str]], float]] = staticmethod(string_match_all)

    def score(self, sample: Sample, output: str) -> float:
        return type(self).scorer(output, sample.expected)

    def is_complete(self, sample: Sample, output: str) -> bool:
        return self.score(sample, output) >= 1.0

    def sample(
        self,
        fmt: PromptFormat,
        fitted: tuple[Parts, str, list[int]],
        length: int,
        seed: int,
        index: int,
    ) -> Sample:
        parts, prompt, ids = fitted
        return self.make_sample(
            fmt, parts, prompt, ids, length, None, seed, index, self.max_new_tokens
        )


# ---- needle in a haystack


class _RulerNiah(_RulerTask):
    """RULER's NIAH: ``num_k`` keys with ``num_v`` values each; ``num_q`` keys are asked."""

    haystack_kind: ClassVar[str] = "essay"
    key_type: ClassVar[str] = "words"
    value_type: ClassVar[str] = "numbers"
    num_k: ClassVar[int] = 1
    num_v: ClassVar[int] = 1
    num_q: ClassVar[int] = 1
    max_new_tokens: ClassVar[int] = 128

    def generate(
        self, fmt: PromptFormat, length: int, depth: float | None, seed: int, index: int
    ) -> Sample:
        rng = self.rng(seed, index)
        num_k = max(self.num_k, self.num_q)
        keys: list[str] = []
        while len(keys) < num_k:
            key = _random_value(self.key_type, rng)
            if key not in keys:
                keys.append(key)
        values = [[_random_value(self.value_type, rng) for _ in range(self.num_v)] for _ in keys]
        needles = [
            NEEDLE.format(kind=self.value_type, key=key, value=value)
            for key, vs in zip(keys, values, strict=True)
            for value in vs
        ]
        rng.shuffle(needles)
        asked = rng.sample(range(num_k), self.num_q)
        query = _join_queries([keys[i] for i in asked])
        answers = [v for i in asked for v in values[i]]
        one = self.num_q * self.num_v == 1  # RULER's singular wording
        kind = self.value_type[:-1] if one else self.value_type
        parts = functools.partial(
            Parts,
            f"{'A' if one else 'Some'} special magic {kind} {'is' if one else 'are'} hidden "
            "within the following text. Make sure to memorize it. I will quiz you about the "
            f"{kind} afterwards.\n",
            question=f"\nWhat {'is' if one else 'are all'} the special magic {kind} for {query} "
            "mentioned in the provided text?",
            answer_prefix=f" The special magic {kind} for {query} mentioned in the provided "
            f"text {'is' if one else 'are'}",
            expected=answers,
        )
        if self.haystack_kind == "essay":
            hay = tokenized_haystack(resolve_haystack(self.haystack), fmt.tokenizer)  # type: ignore[attr-defined]
            start = hay.start_token(random.Random(f"{self.name}|{seed}|{index}|start"), length)
            depths = sorted(d / 100 for d in rng.sample(DEPTHS, len(needles)))

            def build(n: int) -> Parts:
                context, at = insert_needles(hay.piece(start, n), needles, depths)
                return parts(context=context, meta={"needle_depths": at, "query": query})

            return self.sample(fmt, fit_ruler(self, fmt, length, build), length, seed, index)

        fractions = [rng.random() for _ in needles]
        line = NOISE
        distractors: list[str] = []
        if self.haystack_kind == "needle":
            other = random.Random(f"{self.name}|{seed}|{index}|distractors")

            def distractor() -> str:
                key = _random_value(self.key_type, other)
                while key in keys:
                    key = _random_value(self.key_type, other)
                value = _random_value(self.value_type, other)
                return NEEDLE.format(kind=self.value_type, key=key, value=value)

            line = distractor()

        def build_lines(n: int) -> Parts:
            if self.haystack_kind == "needle":
                while len(distractors) < n:
                    distractors.append(distractor())
                filler = distractors[:n]
            else:
                filler = [NOISE] * n
            context = "\n".join(_insert_lines(filler, needles, fractions))
            return parts(context=context, meta={"needle_fractions": fractions, "query": query})

        per = _token_count(fmt, line + "\n")
        fitted = fit_ruler(self, fmt, length, build_lines, per)
        return self.sample(fmt, fitted, length, seed, index)


@dataclass
class _EssayNiah(_RulerNiah):
    """A RULER needle task in essays: ``haystack`` is ``pg`` (the default) or any text."""

    haystack: str = "pg"

    uses_haystack: ClassVar[bool] = True


@dataclass
class NiahSingle1(_RulerNiah):
    name = "niah_single_1"
    summary = "RULER: one number needle in repeated noise lines"
    haystack_kind = "noise"


@dataclass
class NiahSingle2(_EssayNiah):
    name = "niah_single_2"
    summary = "RULER: one number needle in essays"


@dataclass
class NiahSingle3(_EssayNiah):
    name = "niah_single_3"
    summary = "RULER: one uuid needle in essays"
    value_type = "uuids"


@dataclass
class NiahMultikey1(_EssayNiah):
    name = "niah_multikey_1"
    summary = "RULER: the needle of one key among 4 keys' needles in essays"
    num_k = 4


@dataclass
class NiahMultikey2(_RulerNiah):
    name = "niah_multikey_2"
    summary = "RULER: one needle among distractor needles (word keys)"
    haystack_kind = "needle"


@dataclass
class NiahMultikey3(_RulerNiah):
    name = "niah_multikey_3"
    summary = "RULER: one needle among distractor needles (uuid keys and values)"
    haystack_kind = "needle"
    key_type = "uuids"
    value_type = "uuids"


@dataclass
class NiahMultivalue(_EssayNiah):
    name = "niah_multivalue"
    summary = "RULER: all 4 values of one key in essays"
    num_v = 4


@dataclass
class NiahMultiquery(_EssayNiah):
    name = "niah_multiquery"
    summary = "RULER: the values of 4 keys asked at once, in essays"
    num_q = 4


NIAH_TASKS: list[type[Task]] = [
    NiahSingle1, NiahSingle2, NiahSingle3, NiahMultikey1, NiahMultikey2, NiahMultikey3,
    NiahMultivalue, NiahMultiquery,
]  # fmt: skip


# ---- variable tracking


@dataclass
class RulerVariableTracking(_RulerTask):
    """``chains`` chains "VAR X = 12345", "VAR Y = VAR X", ... of ``hops`` hops in noise lines.

    One solved example (3-letter names, up to 10 hops, about 500 tokens) comes first, as in RULER.
    """

    chains: int = 1
    hops: int = 4

    name: ClassVar[str] = "vt"
    summary: ClassVar[str] = "RULER's variable tracking: every variable of a chain of assignments"
    max_new_tokens: ClassVar[int] = 30
    example_tokens: ClassVar[int] = 500

    def validate(self) -> None:
        if not 1 <= self.chains <= 16 or not 1 <= self.hops <= 64:
            raise LongreachError(
                f"vt chains={self.chains}, hops={self.hops} is out of range; use 1-16 chains "
                "and 1-64 hops."
            )

    @staticmethod
    def _chains(rng: random.Random, chains: int, hops: int, letters: int) -> tuple[list, list]:
        names: list[str] = []
        while len(names) < chains * (hops + 1):
            name = "".join(rng.choices(string.ascii_uppercase, k=letters))
            if name not in names:
                names.append(name)
        groups = [names[c * (hops + 1) : (c + 1) * (hops + 1)] for c in range(chains)]
        statements = []
        for group in groups:
            value = str(rng.randint(10000, 99999))
            statements.append(
                [f"VAR {group[0]} = {value}"]
                + [f"VAR {group[j + 1]} = VAR {group[j]}" for j in range(hops)]
            )
        return groups, statements

    def _parts(self, context: str, value: str, hops: int, head: str, names: list[str]) -> Parts:
        return Parts(
            head + "Memorize and track the chain(s) of variable assignment hidden in the "
            "following text.\n\n",
            context,
            f"\nQuestion: Find all variables that are assigned the value {value} in the text above.",
            " Answer: According to the chain(s) of variable assignment in the text above, "
            f"{hops + 1} variables are assigned the value {value}, they are:",
            names,
        )

    def _build(self, rng: random.Random, chains: int, hops: int, letters: int, head: str):
        groups, statements = self._chains(rng, chains, hops, letters)
        fractions = [sorted(rng.random() for _ in chain) for chain in statements]
        value = statements[0][0].rsplit("= ", 1)[1]

        def build(n: int) -> Parts:
            lines = [NOISE] * n
            for chain, fr in zip(statements, fractions, strict=True):
                lines = _insert_lines(lines, chain, fr)
            return self._parts("\n".join(lines), value, hops, head, groups[0])

        return build

    def generate(
        self, fmt: PromptFormat, length: int, depth: float | None, seed: int, index: int
    ) -> Sample:
        rng = self.rng(seed, index)
        per = _token_count(fmt, NOISE + "\n")
        raw = PromptFormat(fmt.tokenizer, chat=False)
        hops = min(10, self.hops)
        example_build = self._build(rng, self.chains, hops, 3, "")
        example, text, _ = fit_to_length(example_build, raw, self.example_tokens, self.spec(), per)
        head = text + " " + " ".join(example.expected) + "\n\n"
        build = self._build(rng, self.chains, self.hops, 5, head)
        return self.sample(fmt, fit_ruler(self, fmt, length, build, per), length, seed, index)


# ---- common and frequent words


@dataclass
class RulerCommonWords(_RulerTask):
    """A numbered list where ``num_cw`` words appear ``freq_cw`` times and the rest ``freq_ucw``.

    Below 4096 tokens RULER makes the task easier: the example list has 20 words (3/1) and the
    common words appear 6 times against 1.
    """

    freq_cw: int = 30
    freq_ucw: int = 3
    num_cw: int = 10

    name: ClassVar[str] = "cwe"
    summary: ClassVar[str] = "RULER's common-word extraction: the 10 most common words of a list"
    max_new_tokens: ClassVar[int] = 120

    def validate(self) -> None:
        if not 1 <= self.num_cw <= 100 or not 1 <= self.freq_ucw < self.freq_cw:
            raise LongreachError(
                f"cwe needs 1 <= num_cw <= 100 and 1 <= freq_ucw < freq_cw (got num_cw="
                f"{self.num_cw}, freq_cw={self.freq_cw}, freq_ucw={self.freq_ucw})."
            )

    def _template(self, listing: str) -> tuple[str, str, str, str]:
        return (
            "Below is a numbered list of words. In these words, some appear more often than "
            "others. Memorize the ones that appear most often.\n",
            listing,
            f"\nQuestion: What are the {self.num_cw} most common words in the above list?",
            f" Answer: The top {self.num_cw} words that appear most often in the list are:",
        )

    @staticmethod
    def _listing(common: list[str], rare: list[str], cr: int, ur: int, rng: random.Random) -> str:
        words = common * cr + rare * ur
        rng.shuffle(words)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))

    def generate(
        self, fmt: PromptFormat, length: int, depth: float | None, seed: int, index: int
    ) -> Sample:
        rng = self.rng(seed, index)
        pool = rng.sample(all_words(), len(all_words()))
        if length < 4096:
            shot, (cr, ur) = (20, 3, 1), (6, 1)
        else:
            shot, (cr, ur) = (40, 10, 3), (self.freq_cw, self.freq_ucw)
        size, scr, sur = shot
        shot_words = pool[-size:]  # the example's words never repeat in the main list
        listing = self._listing(shot_words[: self.num_cw], shot_words[self.num_cw :], scr, sur, rng)
        head, _, question, prefix = self._template(listing)
        numbered = " ".join(f"{i + 1}. {w}" for i, w in enumerate(shot_words[: self.num_cw]))
        example = head + listing + question + prefix + " " + numbered + "\n"
        available = len(pool) - size - self.num_cw
        common = pool[: self.num_cw]
        key = f"{self.name}|{seed}|{index}|order"

        def build(n: int) -> Parts:
            if n > available:
                raise SourceTooShort(
                    "the word list", available, n, "words for this length; ask for a shorter one."
                )
            rare = pool[self.num_cw : self.num_cw + n]
            text = self._listing(common, rare, cr, ur, random.Random(f"{key}|{n}"))
            instruction, context, q, p = self._template(text)
            return Parts(example + instruction, context, q, p, list(common))

        per = ur * (
            _token_count(fmt, " ".join(f"{i + 1}. {w}" for i, w in enumerate(pool[:50]))) / 50
        )
        return self.sample(fmt, fit_ruler(self, fmt, length, build, per), length, seed, index)


def zeta(alpha: float) -> float:
    """Riemann zeta(alpha) for alpha > 1: a partial sum plus its Euler-Maclaurin tail."""
    n = 1000
    head = math.fsum(k**-alpha for k in range(1, n))
    return head + n ** (1 - alpha) / (alpha - 1) + 0.5 * n**-alpha + alpha * n ** (-alpha - 1) / 12


@dataclass
class RulerFrequentWords(_RulerTask):
    """Coded words of ``coded_wordlen`` letters whose counts follow Zipf's law, N·k^-alpha/zeta(alpha).

    The most frequent word is replaced by "..." (noise); the answer is ranks 2 to 4. The
    vocabulary has (length - 50) // 50 words unless ``vocab_size`` is set.
    """

    alpha: float = 2.0
    coded_wordlen: int = 6
    vocab_size: int = 0

    name: ClassVar[str] = "fwe"
    summary: ClassVar[str] = "RULER's frequent-word extraction: the 3 most frequent coded words"
    max_new_tokens: ClassVar[int] = 50

    def validate(self) -> None:
        if (
            not 1 < self.alpha <= 10
            or not 2 <= self.coded_wordlen <= 20
            or (self.vocab_size != 0 and self.vocab_size < 5)
        ):
            raise LongreachError(
                f"fwe needs 1 < alpha <= 10, 2 <= coded_wordlen <= 20 and vocab_size >= 5 "
                f"(0: automatic); got alpha={self.alpha:g}, coded_wordlen={self.coded_wordlen}, "
                f"vocab_size={self.vocab_size}."
            )

    def generate(
        self, fmt: PromptFormat, length: int, depth: float | None, seed: int, index: int
    ) -> Sample:
        rng = self.rng(seed, index)
        size = self.vocab_size or max(5, (length - self.max_new_tokens) // 50)
        vocab: set[str] = set()
        while len(vocab) < size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=self.coded_wordlen)))
        words = sorted(vocab)
        rng.shuffle(words)
        words[0] = "..."
        z = zeta(self.alpha)
        answer = words[1:4]
        key = f"{self.name}|{seed}|{index}|order"

        def counts(n: int) -> list[int]:
            return [int(n * (k + 1) ** -self.alpha / z) for k in range(len(words))]

        def build(n: int) -> Parts:
            text = [w for w, c in zip(words, counts(n), strict=True) for _ in range(c)]
            random.Random(f"{key}|{n}").shuffle(text)
            return Parts(
                "Read the following coded text and track the frequency of each coded word. "
                "Find the three most frequently appeared coded words. ",
                " ".join(text),
                "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
                "What are the three most frequently appeared words in the above coded text?",
                " Answer: According to the coded text above, the three most frequently "
                "appeared words are:",
                answer,
                {"counts": counts(n)[:5]},
            )

        per = _token_count(fmt, " ".join(words[1:51])) / min(50, len(words) - 1)
        fitted = fit_ruler(self, fmt, length, build, per)
        top = fitted[0].meta["counts"] + [0, 0]
        if top[3] < 1 or top[3] <= top[4]:  # rank 4 must be in the text and beat rank 5
            raise LongreachError(
                f"length {length} is too short for task 'fwe': its three most frequent words "
                "would not stand out; ask for a longer length."
            )
        return self.sample(fmt, fitted, length, seed, index)


# ---- question answering over documents


@dataclass(frozen=True)
class QaRow:
    question: str
    answers: tuple[str, ...]
    documents: tuple[str, ...]
    distractors: tuple[str, ...] = ()


SHIPPED_QA = {"squad": DATA / "qa_squad_tiny.jsonl", "hotpotqa": DATA / "qa_hotpot_tiny.jsonl"}


def _qa_path(spec: str) -> Path:
    return SHIPPED_QA.get(spec) or Path(spec).expanduser()


@functools.lru_cache(maxsize=8)
def load_qa_file(path: str) -> tuple[tuple[QaRow, ...], str]:
    """The rows of a QA file and the digest of its bytes; a bad file is a one-line error."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise LongreachError(
            f"cannot read QA file {p} ({exc.strerror or exc}); check the path."
        ) from None
    rows = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"QA file {p} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise LongreachError(
                f"{where} is not JSON; a QA file has one JSON object per line."
            ) from None
        if not isinstance(row, dict):
            raise LongreachError(f"{where} is not a JSON object; write one object per line.")
        missing = [f for f in ("question", "answers", "documents") if f not in row]
        if missing:
            raise LongreachError(
                f"{where} has no {', '.join(repr(f) for f in missing)}; each row needs "
                "'question', 'answers' and 'documents'."
            )
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise LongreachError(f"{where}: 'question' must be a non-empty string.")
        fields = {}
        for name in ("answers", "documents", "distractors"):
            value = row.get(name, [])
            if not isinstance(value, list) or not all(
                isinstance(v, str) and v.strip() for v in value
            ):
                raise LongreachError(f"{where}: {name!r} must be a list of non-empty strings.")
            if name != "distractors" and not value:
                raise LongreachError(f"{where}: {name!r} is empty; give at least one.")
            fields[name] = tuple(value)
        rows.append(QaRow(row["question"], **fields))
    if not rows:
        raise LongreachError(f"QA file {p} has no rows; write one JSON object per line.")
    return tuple(rows), hashlib.sha256(raw).hexdigest()[:10]


class _RulerQa(_RulerTask):
    """A question with its gold documents among distractors, "Document i:\\n..." each.

    Distractors are the row's own (e.g. the other paragraphs of a SQuAD article) first, then
    the documents of the other rows. Sample ``index`` asks row ``index`` modulo the file's rows.
    """

    max_new_tokens: ClassVar[int] = 32
    scorer: ClassVar[Callable[[str, list[str]], float]] = staticmethod(string_match_part)

    def validate(self) -> None:
        load_qa_file(str(_qa_path(self.file).resolve()))  # type: ignore[attr-defined]

    def params(self) -> dict[str, Any]:
        spec = self.file  # type: ignore[attr-defined]
        if spec in SHIPPED_QA:
            return {"file": spec}
        path = _qa_path(spec).resolve()
        return {"file": f"{path.name}@{load_qa_file(str(path))[1]}"}

    def generate(
        self, fmt: PromptFormat, length: int, depth: float | None, seed: int, index: int
    ) -> Sample:
        path = _qa_path(self.file).resolve()  # type: ignore[attr-defined]
        rows, _ = load_qa_file(str(path))
        row = rows[index % len(rows)]
        rng = self.rng(seed, index)
        gold = list(dict.fromkeys(row.documents))
        own = [d for d in dict.fromkeys(row.distractors) if d not in gold]
        rng.shuffle(own)
        taken = set(gold) | set(own)
        rest = sorted({d for r in rows for d in r.documents + r.distractors} - taken)
        rng.shuffle(rest)
        extra = own + rest
        key = f"{self.name}|{seed}|{index}|order"

        def build(n: int) -> Parts:
            if n > len(extra):
                raise SourceTooShort(
                    f"QA file {path.name}",
                    len(extra) + len(gold),
                    n + len(gold),
                    "documents for this length; give a QA file with more documents or ask "
                    "for a shorter length.",
                )
            docs = gold + extra[:n]
            random.Random(f"{key}|{n}").shuffle(docs)
            context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
            return Parts(
                "Answer the question based on the given documents. Only give me the answer and "
                "do not output any other words.\n\nThe following are given documents.\n\n",
                context,
                "\n\nAnswer the question based on the given documents. Only give me the answer "
                f"and do not output any other words.\n\nQuestion: {row.question}",
                " Answer:",
                list(row.answers),
                {"row": index % len(rows), "documents": len(docs)},
            )

        sample_docs = extra[:8] or gold
        per = sum(_token_count(fmt, f"Document 10:\n{d}\n\n") for d in sample_docs) / len(
            sample_docs
        )
        return self.sample(fmt, fit_ruler(self, fmt, length, build, per), length, seed, index)


@dataclass
class RulerQaSquad(_RulerQa):
    """RULER's qa_1 (SQuAD): one gold paragraph. ``file``: ``squad`` (shipped) or a QA file."""

    file: str = "squad"

    name: ClassVar[str] = "qa_1"
    summary: ClassVar[str] = "RULER's single-hop QA (SQuAD-like QA file) among distractor documents"


@dataclass
class RulerQaHotpot(_RulerQa):
    """RULER's qa_2 (HotpotQA): two gold paragraphs. ``file``: ``hotpotqa`` (shipped) or a QA file."""

    file: str = "hotpotqa"

    name: ClassVar[str] = "qa_2"
    summary: ClassVar[str] = (
        "RULER's multi-hop QA (HotpotQA-like QA file) among distractor documents"
    )


RULER_TASKS: list[type[Task]] = [
    *NIAH_TASKS,
    RulerVariableTracking,
    RulerCommonWords,
    RulerFrequentWords,
    RulerQaSquad,
    RulerQaHotpot,
]
RULER_NAMES = tuple(cls.name for cls in RULER_TASKS)
