"""One document, many questions: encode a long text once, then ask it questions from its cache.

:meth:`Context.encode` prefills the document under a method (vanilla, a RoPE method, a
memory or an eviction policy) and keeps the KV cache; :meth:`Context.ask` feeds only the
question after it and decodes greedily, so a question costs its own tokens, never the
document's again. :meth:`Context.save` writes the cache to one safetensors file whose header
records the model's fingerprint, the method, the token count and the cache type;
:meth:`Context.load` refuses a file made under another model or another method::

    import longreach as lr
    model, tok = lr.load("lab")
    ctx = lr.Context.encode(model, tok, contract_text, method="yarn:factor=4")
    print(ctx.ask("\\nWho signs the contract?", max_new_tokens=16))
    ctx.save("contract.ctx")
    ctx = lr.Context.load("contract.ctx", model, tok)

How a question leaves the document's cache as it was depends on the cache type:

- ``DynamicCache`` (vanilla, every RoPE and attention-layout method): one cache, cropped back
  to the document's length after each question (``Cache.crop``). Under a method whose keys
  do not depend on the input's length the answer is token for token that of one prefill of
  document + question.
- the eviction methods' ``EvictingCache`` (h2o, snapkv, sirllm, spans) and streaming's
  ``StreamingCache``: a question's tokens make the policy evict document tokens, which a crop
  cannot bring back, so each question runs on a copy of the document's cache (a memory copy,
  no forward pass).
- infllm's ``BlockMemoryCache``: copied per question while its memory is in RAM; a memory
  with blocks on disk is refused (a copy would share its files).

Each cache class declares its rule with a ``context_reuse`` attribute, ``"crop"`` or
``"copy"`` (a plain ``DynamicCache`` without one is cropped, any other cache copied). Saving supports the cropped kind (``DynamicCache``); the others are refused in one
line. Reader methods (infiniretri, xl3m) read the document per question and are refused.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longreach import compat
from longreach.errors import LongreachError

__all__ = ["Answer", "Context", "reuse_rule"]

FORMAT = "longreach-context"
FORMAT_VERSION = 1
CROP, COPY = "crop", "copy"


@dataclass
class Answer:
    """An answer's tokens and its cost: ``question_tokens`` read in ``question_s`` seconds,
    then ``len(tokens)`` decoded in ``decode_s`` (one forward per token after the first)."""

    tokens: list[int]
    question_tokens: int
    question_s: float
    decode_s: float


ProgressFn = Callable[[int, int], None]  # (tokens encoded so far, document tokens)
Stop = str | Sequence[str] | Callable[[str], bool] | None


def reuse_rule(cache: Any) -> str:
    """``"crop"`` or ``"copy"``: how a question leaves ``cache`` as the document left it.

    Raises a LongreachError for a cache that can do neither (a block memory with blocks on disk).
    """
    declared = getattr(cache, "context_reuse", None)  # a cache class's own rule
    if declared in (CROP, COPY):
        return declared
    from transformers import DynamicCache

    return CROP if isinstance(cache, DynamicCache) else COPY


def _model_memo(model: torch.nn.Module) -> dict[int, Any]:
    """A deepcopy memo that keeps the model's modules and tensors shared (a cache's rotary)."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        memo[id(module)] = module
    for tensor in [*model.parameters(), *model.buffers()]:
        memo[id(tensor)] = tensor
    return memo


class Context:
    """A document encoded once under a method: ask it questions, save it, load it back.

    Build one with :meth:`encode` or :meth:`load`. ``length`` is the document's tokens,
    ``method`` the method's canonical spec, ``cache`` the document's KV cache, ``reuse``
    ``"crop"`` or ``"copy"`` (see the module docstring) and ``questions`` the questions
    asked so far.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        method: Any,
        cache: Any,
        logits: torch.Tensor,
        length: int,
        chunk: int,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self._method = method
        self.cache = cache
        self.logits = logits  # (1, vocab) fp32: the document's last position
        self.length = length
        self.chunk = chunk
        self.reuse = reuse_rule(cache)
        self.questions = 0
        from longreach.bench.runner import _eos_ids

        self.eos = _eos_ids(model, tokenizer)

    # ---- building

    @classmethod
    def encode(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        document: str | Sequence[int] | torch.Tensor,
        method: Any = None,
        *,
        chunk: int = 1024,
        progress: ProgressFn | None = None,
    ) -> Context:
        """Prefill ``document`` (text, token ids, or a (1, n) tensor) once and keep its cache.

        ``method``: a spec (``"yarn:factor=4"``) or a Method; None takes the method applied
        to ``model`` (vanilla when none is). ``chunk``: tokens per forward pass.
        ``progress(done, total)`` is called after each chunk. Text is encoded with the
        tokenizer's special tokens (a BOS where it has one).
        """
        from longreach.methods import build_method

        if chunk < 1:
            raise LongreachError(
                f"a context's chunk must be a positive number of tokens, got {chunk}."
            )
        if method is None:
            active = _active_methods(model)
            built = active[0] if len(active) == 1 else build_method("vanilla")
            if len(active) > 1:
                raise LongreachError(
                    f"the model has {len(active)} methods applied; name the one to encode "
                    "under with method=."
                )
        else:
            built = build_method(method) if isinstance(method, str) else method
        if built.reader:
            raise LongreachError(
                f"{built.name} reads the document anew for each question, so it cannot encode a "
                "context once; use lr.read for it, or another method here."
            )
        ids = _as_ids(tokenizer, document, model.device, special=True)
        n = ids.shape[1]
        from longreach.prefill import Prefill, advance, planned_length

        with _applied(model, built) as extension, torch.inference_mode():
            cache = extension.new_cache() if extension is not None else None
            if cache is None:
                from transformers import DynamicCache

                cache = DynamicCache()
            state = Prefill(cache, torch.empty(0), 0)
            with planned_length(n):
                for start in range(0, n, chunk):
                    advance(model, state, ids[:, start : start + chunk], chunk)
                    if progress is not None:
                        progress(state.length, n)
        return cls(model, tokenizer, built, state.cache, state.logits, n, chunk)

    # ---- asking

    @property
    def method(self) -> str:
        """The method's spec, naming the parameters that differ from their defaults."""
        return self._method.to_spec()

    def ask(
        self,
        question: str,
        max_new_tokens: int = 64,
        stop: Stop = None,
        *,
        stop_at_eos: bool = True,
    ) -> str:
        """The greedy answer to ``question``, read after the document (without re-reading it).

        ``question`` is tokenized without special tokens and fed right after the document, so
        write the separator it needs (``"\\n\\nWhat is ...? Answer:"``). Decoding stops at
        ``max_new_tokens``, at the model's end-of-sequence token (unless ``stop_at_eos`` is
        False), or once ``stop`` matches: a string or strings (the answer is cut before the
        first one), or a function of the answer so far that returns True.
        """
        ids = self.tokenizer(question, add_special_tokens=False)["input_ids"]
        new = self.ask_ids(ids, max_new_tokens, stop, stop_at_eos=stop_at_eos)
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and not callable(stop):
            cuts = [text.find(s) for s in stop if s and s in text]
            if cuts:
                text = text[: min(cuts)]
        return text

    def ask_ids(
        self,
        question_ids: Sequence[int] | torch.Tensor,
        max_new_tokens: int = 64,
        stop: Stop = None,
        *,
        stop_at_eos: bool = True,
    ) -> list[int]:
        """The greedy answer's token ids for ``question_ids`` fed after the document."""
        return self.answer_ids(question_ids, max_new_tokens, stop, stop_at_eos=stop_at_eos).tokens

    def answer_ids(
        self,
        question_ids: Sequence[int] | torch.Tensor,
        max_new_tokens: int = 64,
        stop: Stop = None,
        *,
        stop_at_eos: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> Answer:
        """:meth:`ask_ids` with its cost: the seconds reading the question and decoding."""
        from longreach.prefill import advance, greedy

        if max_new_tokens < 1:
            raise LongreachError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        q = self._question(question_ids)
        done = _stop_rule(self.tokenizer, stop)
        with self._question_state() as state:
            t0 = clock()
            advance(self.model, state, q, self.chunk)
            t1 = clock()
            eos = self.eos if stop_at_eos else None
            new = greedy(self.model, state, max_new_tokens, eos, stop=done)
            t2 = clock()
        return Answer([int(t) for t in new[0]], q.shape[1], t1 - t0, t2 - t1)

    def score_ids(self, tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The logits (k, vocab), fp32, at every position of ``tokens`` fed after the document."""
        from longreach.prefill import score

        q = self._question(tokens)
        with self._question_state() as state:
            logits = score(self.model, state, q)
        return logits[0]

    def _question(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        q = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids)
        q = q.reshape(1, -1).to(device=self.model.device, dtype=torch.long)
        if q.shape[1] == 0:
            raise LongreachError("the question is empty; ask with at least one token.")
        return q

    @contextmanager
    def _question_state(self) -> Iterator[Any]:
        """A decoding state positioned right after the document, on this question's cache.

        Crop: the context's own cache, cut back to the document when the question ends (even
        when it fails). Copy: a copy of the document's cache, dropped afterwards.
        """
        from longreach.prefill import Prefill

        with _applied(self.model, self._method), torch.inference_mode():
            if self.reuse == CROP:
                cache = self.cache
            else:
                reuse_rule(self.cache)  # a memory that spilled to disk since: refuse now
                cache = copy.deepcopy(self.cache, _model_memo(self.model))
            state = Prefill(cache, self.logits.clone(), self.length)
            try:
                yield state
            finally:
                if self.reuse == CROP:
                    compat.crop_cache(self.cache, self.length)
                    if int(self.cache.get_seq_length()) != self.length:
                        raise LongreachError(
                            f"the context's cache did not crop back to {self.length} tokens; "
                            "encode the document again."
                        )
        self.questions += 1

    # ---- saving

    def save(self, path: str | os.PathLike) -> Path:
        """Write the document's cache and a JSON header to ``path`` (one safetensors file).

        The header holds the model's fingerprint and name, the method, the token count, the
        cache type and the longreach version. The file is written under a temporary name and
        renamed into place.
        """
        from safetensors.torch import save_file

        import longreach
        from longreach.bench.plan import model_fingerprint

        if self.reuse != CROP:
            raise LongreachError(
                f"saving a context whose cache is a {type(self.cache).__name__} is not supported; "
                "contexts under methods with transformers' DynamicCache (vanilla, yarn, ntk, "
                "self-extend, lm-infinite, ...) can be saved."
            )
        tensors = {"logits": self.logits.detach().contiguous().cpu()}
        layers = _layers(self.cache)
        for i, (keys, values) in enumerate(layers):
            tensors[f"layers.{i}.keys"] = keys.detach().contiguous().cpu()
            tensors[f"layers.{i}.values"] = values.detach().contiguous().cpu()
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "longreach": longreach.__version__,
            "model": str(
                getattr(self.model, "longreach_source", None) or type(self.model).__name__
            ),
            "model_fingerprint": model_fingerprint(self.model, self.tokenizer),
            "method": self.method,
            "method_params": _params(self._method),
            "tokens": self.length,
            "cache_type": type(self.cache).__name__,
            "layers": len(layers),
            "chunk": self.chunk,
        }
        out = Path(path).expanduser()
        tmp = out.with_name(f".{out.name}.tmp")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata={"longreach": json.dumps(header)})
            os.replace(tmp, out)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise LongreachError(
                f"cannot write the context to {out} ({exc.strerror or exc}); pass a path in a "
                "writable folder."
            ) from None
        return out

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model: torch.nn.Module,
        tokenizer: Any,
        method: Any = None,
    ) -> Context:
        """A context saved by :meth:`save`, for ``model`` and ``tokenizer``.

        ``method`` (optional) must be the method it was encoded under. Refused in one line:
        a file that is not a saved context, another model (fingerprint), another method, or a
        model with another method applied.
        """
        from safetensors import safe_open
        from transformers import DynamicCache

        from longreach.bench.plan import model_fingerprint
        from longreach.methods import build_method

        where = Path(path).expanduser()
        header = _read_header(where)
        saved = header["method"]
        built = build_method(saved)
        if _params(built) != header.get("method_params", _params(built)):
            raise LongreachError(
                f"{where} was encoded under {saved} with parameters {header['method_params']}, "
                f"but {saved} now means {_params(built)} (changed defaults); encode the "
                "document again."
            )
        if method is not None:
            asked = build_method(method) if isinstance(method, str) else method
            if asked != built:
                raise LongreachError(
                    f"{where} was encoded under method {saved}, not {asked.to_spec()}; load it "
                    f"with method={saved!r} or encode the document again under {asked.to_spec()}."
                )
        fingerprint = model_fingerprint(model, tokenizer)
        if fingerprint != header["model_fingerprint"]:
            name = getattr(model, "longreach_source", None) or type(model).__name__
            raise LongreachError(
                f"{where} was encoded by model {header['model']} (fingerprint "
                f"{header['model_fingerprint']}), not by this model {name} (fingerprint "
                f"{fingerprint}, another model, dtype or tokenizer); load it with the model that "
                "encoded it."
            )
        active = _active_methods(model)
        if active and active != [built]:
            raise LongreachError(
                f"{where} was encoded under method {saved}, but the model has "
                f"{', '.join(m.to_spec() for m in active)} applied; remove it first."
            )
        cache = built.new_cache(model)
        cache = DynamicCache() if cache is None else cache
        if type(cache).__name__ != header["cache_type"]:
            raise LongreachError(
                f"{where} holds a {header['cache_type']} but {saved} makes a "
                f"{type(cache).__name__} on this model; encode the document again."
            )
        device = model.device
        dtype = next(model.parameters()).dtype
        with safe_open(str(where), framework="pt") as f:
            logits = f.get_tensor("logits").to(device)
            for i in range(int(header["layers"])):
                keys = f.get_tensor(f"layers.{i}.keys").to(device=device, dtype=dtype)
                values = f.get_tensor(f"layers.{i}.values").to(device=device, dtype=dtype)
                cache.update(keys, values, i)
        if int(cache.get_seq_length()) != int(header["tokens"]):
            raise LongreachError(
                f"{where} holds {cache.get_seq_length()} tokens but its header says "
                f"{header['tokens']}; the file is damaged: encode the document again."
            )
        chunk = int(header.get("chunk", 1024))
        return cls(model, tokenizer, built, cache, logits, int(header["tokens"]), chunk)

    def __repr__(self) -> str:
        return (
            f"<Context {self.length} tokens under {self._method.to_spec()}, "
            f"{type(self.cache).__name__} ({self.reuse} per question), "
            f"{self.questions} questions asked>"
        )


# --------------------------------------------------------------------------- helpers


def _active_methods(model: torch.nn.Module) -> list[Any]:
    from longreach.methods import active_extensions

    return [e.method for e in active_extensions(model) if e.active]


def _applied(model: torch.nn.Module, method: Any):
    """The method applied for the duration of a block: the model's own application when it
    has exactly this method applied, else applied here (and removed afterwards). The same
    Method object every time, so a method's state kept per cache survives between questions."""
    from longreach.methods import active_extensions

    active = [e for e in active_extensions(model) if e.active]
    if len(active) == 1 and active[0].method == method:
        return nullcontext(active[0])
    if active:
        raise LongreachError(
            f"this context is under method {method.to_spec()}, but the model has "
            f"{', '.join(e.method.to_spec() for e in active)} applied; remove it first."
        )
    from longreach.extend import extend

    return extend(model, method)


def _params(method: Any) -> dict[str, Any]:
    """The method's every parameter, as JSON values (what a saved context records)."""
    return json.loads(json.dumps(method.params(), default=str))


def _as_ids(tokenizer: Any, document: Any, device: Any, special: bool) -> torch.Tensor:
    if isinstance(document, str):
        if not document:
            raise LongreachError("the document is empty; encode at least one token.")
        ids = tokenizer(document, add_special_tokens=special, verbose=False)["input_ids"]
        x = torch.tensor([ids], dtype=torch.long)
    else:
        x = torch.as_tensor(
            list(document) if not isinstance(document, torch.Tensor) else document
        ).to(torch.long)
        x = x.reshape(1, -1) if x.dim() == 1 else x
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] == 0:
        raise LongreachError(
            f"a context holds one document of at least one token, got ids of shape {tuple(x.shape)}."
        )
    return x.to(device)


def _stop_rule(tokenizer: Any, stop: Stop) -> Callable[[torch.Tensor], bool] | None:
    if stop is None:
        return None
    if callable(stop):
        test = stop
    else:
        stops = [stop] if isinstance(stop, str) else [s for s in stop if s]

        def test(text: str) -> bool:
            return any(s in text for s in stops)

    return lambda tokens: bool(test(tokenizer.decode(tokens[0], skip_special_tokens=True)))


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise LongreachError("the context's cache has a layer without keys; encode it again.")
        out.append((keys, values))
    return out


def _read_header(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    if not path.is_file():
        raise LongreachError(f"no saved context at {path}; save one with ctx.save({str(path)!r}).")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - any unreadable file gets the same sentence
        meta = {}
    try:
        header = json.loads(meta.get("longreach", ""))
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise LongreachError(
            f"{path} is not a saved longreach context (no context header); save one with ctx.save."
        )
    if int(header.get("format_version", 0)) > FORMAT_VERSION:
        raise LongreachError(
            f"{path} was saved by a newer longreach ({header.get('longreach')}); upgrade longreach."
        )
    return header
