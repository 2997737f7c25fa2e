"""English word lists for the tasks that need random words: the noun, adjective and verb lists
that the PyPI package ``wonderwords`` ships (the lists RULER and LongChat draw from).

Only entries of lower-case letters are kept: a list entry with a space, a capital or a hyphen
would blur the ``adj-noun`` keys and the numbered word lists.
"""

from __future__ import annotations

import functools
import random
import re
from importlib import resources

from longreach.errors import LongreachError

_PLAIN = re.compile(r"[a-z]+")


@functools.lru_cache(maxsize=4)
def word_list(kind: str) -> tuple[str, ...]:
    """``"noun"``, ``"adjective"`` or ``"verb"``: the sorted, de-duplicated plain words."""
    try:
        text = resources.files("wonderwords.assets").joinpath(f"{kind}list.txt").read_text("utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        raise LongreachError(
            "this task needs the word lists of the PyPI package wonderwords; install it with "
            "`pip install wonderwords`."
        ) from None
    return tuple(sorted({w.strip() for w in text.splitlines() if _PLAIN.fullmatch(w.strip())}))


def adj_noun(rng: random.Random) -> str:
    """A random ``adjective-noun`` pair, uniform over all pairs (e.g. ``"quiet-harbor"``)."""
    return f"{rng.choice(word_list('adjective'))}-{rng.choice(word_list('noun'))}"


@functools.lru_cache(maxsize=1)
def all_words() -> tuple[str, ...]:
    """Nouns, adjectives and verbs together, sorted and de-duplicated (RULER's CWE pool)."""
    return tuple(
        sorted(set(word_list("noun")) | set(word_list("adjective")) | set(word_list("verb")))
    )
