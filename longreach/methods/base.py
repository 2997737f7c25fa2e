"""The shared plumbing of every context-extension method.

A method is a dataclass of validated parameters (``Method``) whose ``install`` makes
its changes to a model through a ``Patch``. The patch records how to undo each
change, so ``Extension.remove()`` returns the model to exactly its earlier state.
The three kinds of change a method may need, all through public extension points:

- RoPE frequencies: replace a rotary module's ``inv_freq`` buffer and its
  ``attention_scaling`` (``Patch.set_attr``), or recompute them before each call
  (``Patch.forward_pre_hook`` on the rotary module);
- an attention function: register it with transformers' ``AttentionInterface`` and a
  matching ``AttentionMaskInterface`` entry, then switch the model to it
  (``Patch.attention``);
- a KV-cache policy: hand the model a fresh policy cache whenever a call starts a new
  sequence (``Patch.cache_policy``), so ``model.generate`` uses it too.
"""

from __future__ import annotations

import dataclasses
import typing
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from longreach.errors import LongreachError
from longreach.params import coerce as _coerce  # one conversion for methods and tasks
from longreach.params import field_help as _field_help
from longreach.params import param  # noqa: F401 - re-exported: the methods' field helper

# Resources a method may change; two active methods on one model must not share one.
ROPE = "rope"
ATTENTION = "attention"
CACHE = "cache"

_RESOURCE_WORDS = {
    ROPE: "RoPE frequencies",
    ATTENTION: "the attention function",
    CACHE: "the KV cache",
}


@dataclasses.dataclass
class Method:
    """Base class: a context-extension method as a dataclass of validated parameters.

    Subclasses set ``name`` (the registry key), ``paper`` (the citation shown by
    ``longreach methods``) and ``touches`` (the resources they change), declare their
    parameters as dataclass fields with a ``help`` metadata entry, check them in
    ``validate`` and make their changes in ``install``. Parameters given as strings
    (from a spec such as ``yarn:factor=4``) are converted to the field types first.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    touches: ClassVar[frozenset[str]] = frozenset()
    # Whether two prompts that share a prefix may share its prefilled cache: False for a
    # method whose cached keys depend on the whole input's length (dynamic NTK rescales
    # with it). Methods that touch the KV cache never share, whatever this says.
    shares_prefix: ClassVar[bool] = True
    # A reader takes over the whole read and answer (``longreach.methods.reader.Reader``):
    # it patches nothing, and the bench calls its ``answer`` instead of prefill + decode.
    reader: ClassVar[bool] = False

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            setattr(self, field.name, _coerce(self.name, field.name, value, hints[field.name]))
        self.validate()

    # ---- for subclasses

    def validate(self) -> None:
        """Raise LongreachError with a one-sentence message when a parameter is invalid."""

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise LongreachError when the method cannot apply to ``model``, saying why."""

    def install(self, model: torch.nn.Module, patch: Patch) -> None:
        """Make the method's changes to ``model``, each through ``patch`` so it can be undone."""
        raise NotImplementedError

    def new_cache(self, model: torch.nn.Module) -> Any:
        """A fresh KV cache for this method's cache policy, or None to keep transformers' default."""
        return None

    def resident_tokens(self, model: torch.nn.Module, tokens: int, chunk: int | None) -> int:
        """The most tokens whose keys and values a read of ``tokens`` holds at once, fed
        ``chunk`` tokens per call (None: all at once). Default: all of them."""
        return tokens

    def new_turn(self, cache: Any) -> None:
        """A conversation's next user turn begins (``longreach.Session`` calls it with its
        cache); a policy whose scores age per turn acts here. Default: nothing."""

    # ---- shared helpers

    def fail(self, message: str) -> typing.NoReturn:
        raise LongreachError(f"{self.name}: {message}")

    def trained_length(self, model: torch.nn.Module) -> int:
        """L: ``original_max`` when given, else the length the model was trained on."""
        if getattr(self, "original_max", None) is not None:
            return int(self.original_max)
        from longreach.models.info import trained_length

        try:
            return trained_length(model)
        except ValueError:
            self.fail("the model's config names no trained length; pass original_max=<tokens>.")

    def params(self) -> dict[str, Any]:
        """All parameters with their current values, in declaration order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_spec(self) -> str:
        """The spec string that rebuilds this method, naming only non-default parameters."""
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.default is not dataclasses.MISSING and value == field.default:
                continue
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            parts.append(f"{field.name}={value}")
        return self.name + (":" + ",".join(parts) if parts else "")

    @classmethod
    def parameters(cls) -> list[tuple[str, Any, str]]:
        """(name, default, help) for each parameter; the CLI's `methods` table reads this."""
        out = []
        for field in dataclasses.fields(cls):
            default = field.default if field.default is not dataclasses.MISSING else None
            out.append((field.name, default, _field_help(field)))
        return out


# --------------------------------------------------------------------------- patch


class Patch:
    """Changes made to a model, each recorded with its undo, undone in reverse order."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def on_undo(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name`` (an attribute or a registered buffer), restoring the old object on undo."""
        missing = object()
        old = getattr(obj, name, missing)

        def restore() -> None:
            if old is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, old)

        setattr(obj, name, value)
        self._undo.append(restore)

    def forward_pre_hook(self, module: torch.nn.Module, hook: Callable[..., Any]) -> None:
        """Run ``hook(module, args, kwargs)`` before each call of ``module`` (torch's public hook API)."""
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        self._undo.append(handle.remove)

    def attention(
        self,
        model: torch.nn.Module,
        name: str,
        attention_fn: Callable[..., Any],
        mask_fn: Callable[..., Any] | None = None,
    ) -> None:
        """Register ``attention_fn`` under ``name`` with transformers and switch ``model`` to it.

        ``mask_fn`` is the matching AttentionMaskInterface entry; without one the mask
        function of the implementation the model used before is registered, because a
        name missing from that interface makes transformers silently drop padding masks.
        """
        from longreach import compat

        previous = compat.attn_implementation(model)
        compat.register_attention(name, attention_fn, mask_fn, previous)
        model.set_attn_implementation(name)
        self._undo.append(lambda: model.set_attn_implementation(previous))

    def cache_policy(self, model: torch.nn.Module, factory: Callable[[], Any]) -> None:
        """Give each call that starts a new sequence a fresh cache from ``factory()``.

        A call starts a new sequence when it carries no cache or an empty plain
        ``DynamicCache`` (what ``generate`` creates by default, indistinguishable from
        one a caller made). Any other cache is the caller's and is kept. The model
        returns the cache it used, so ``generate`` keeps the policy cache afterwards.
        """
        from longreach import compat

        key = compat.cache_kwarg(model)

        def inject(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            use_cache = kwargs.get("use_cache")
            if use_cache is None:
                use_cache = getattr(getattr(module, "config", None), "use_cache", True)
            if not use_cache:
                return None
            if not compat.is_fresh_default_cache(kwargs.get(key)):
                return None
            kwargs[key] = factory()
            return args, kwargs

        self.forward_pre_hook(model, inject)

    def publish_cache(self, model: torch.nn.Module, cache_type: type, padded: str) -> None:
        """Publish each model call's cache of ``cache_type`` as the call's memory
        (``longreach.attention.context``), for the layouts that read it, and withdraw it when
        the call ends, even when it raises. Calls with padding are refused with ``padded``
        (a memory holds one unpadded sequence)."""
        from longreach import compat
        from longreach.attention import context

        key = compat.cache_kwarg(model)
        tokens: list[Any] = []

        def before(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            cache = kwargs.get(key)
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and not bool(mask.bool().all()):
                raise LongreachError(padded)
            tokens.append(context.enter(cache if isinstance(cache, cache_type) else None))

        def after(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            context.leave(tokens.pop() if tokens else None)

        self.forward_pre_hook(model, before)
        handle = model.register_forward_hook(after, with_kwargs=True, always_call=True)
        self.on_undo(handle.remove)

    def undo(self) -> None:
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as exc:  # noqa: BLE001 - keep undoing the rest, then report
                errors.append(exc)
        if errors:
            raise errors[0]


# --------------------------------------------------------------------------- handle

# Extensions currently applied to each model (weakly keyed: a dropped model frees its entry).
_ACTIVE: weakref.WeakKeyDictionary[torch.nn.Module, list[Extension]] = weakref.WeakKeyDictionary()


class Extension:
    """A method applied to a model: a context manager with ``remove()``.

    Created by ``longreach.extend``; applying happens at creation, so both
    ``with extend(model, "yarn", factor=4): ...`` and ``h = extend(...); ...;
    h.remove()`` work. After ``remove()`` the model computes bit-identical logits to
    before.
    """

    def __init__(self, model: torch.nn.Module, method: Method) -> None:
        self.model = model
        self.method = method
        self._patch: Patch | None = None
        for other in active_extensions(model):
            shared = other.method.touches & method.touches
            if shared:
                what = " and ".join(sorted(_RESOURCE_WORDS[r] for r in shared))
                raise LongreachError(
                    f"{method.name} cannot be applied while {other.method.name} is active on this "
                    f"model: both change {what}; remove the {other.method.name} extension first."
                )
        method.check_model(model)
        patch = Patch()
        try:
            method.install(model, patch)
        except BaseException:
            patch.undo()
            raise
        self._patch = patch
        _ACTIVE.setdefault(model, []).append(self)

    @property
    def active(self) -> bool:
        return self._patch is not None

    def new_cache(self) -> Any:
        """A fresh cache of the method's policy (None when the method keeps transformers' default)."""
        return self.method.new_cache(self.model)

    def remove(self) -> None:
        """Undo every change the method made; calling it again does nothing."""
        if self._patch is None:
            return
        patch, self._patch = self._patch, None
        active = _ACTIVE.get(self.model, [])
        if self in active:
            active.remove(self)
        patch.undo()

    def __enter__(self) -> Extension:
        if self._patch is None:
            raise LongreachError(
                f"this {self.method.name} extension was removed and changes nothing any more; "
                "apply the method again with longreach.extend(model, ...)."
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"<Extension {self.method.to_spec()} on {type(self.model).__name__} ({state})>"


def active_extensions(model: torch.nn.Module) -> list[Extension]:
    """The extensions currently applied to ``model``, oldest first."""
    return list(_ACTIVE.get(model, []))
