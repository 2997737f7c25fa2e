"""``longreach serve``: a model with a longreach method behind an OpenAI-compatible API.

:func:`build_app` loads the model, applies the method for the server's lifetime and returns
the FastAPI application; :func:`serve` runs it with uvicorn. docs/serve.md describes the
routes, the error shapes, the queue and sessions.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longreach.errors import LongreachError

log = logging.getLogger(__name__)

__all__ = ["ServeConfig", "build_app", "serve", "served_length"]


@dataclass
class ServeConfig:
    model: str = "lab"
    method: str = "vanilla"
    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 8
    max_model_len: int | None = None  # default: what the method serves (served_length)
    served_model_name: str | None = None  # default: the model argument
    chat_template: str | None = None  # a Jinja file replacing the tokenizer's template
    chunk: int = 1024
    dtype: str | None = None
    max_sessions: int = 16

    def validate(self) -> None:
        if self.max_queue < 0:
            raise LongreachError(f"--max-queue {self.max_queue} must be 0 or more.")
        if not 0 <= self.port <= 65535:
            raise LongreachError(
                f"--port {self.port} is not a TCP port (0-65535; 0 picks a free one)."
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise LongreachError(f"--max-model-len {self.max_model_len} must be at least 2 tokens.")
        if self.chunk < 1:
            raise LongreachError(f"--chunk {self.chunk} must be a positive number of tokens.")
        if self.max_sessions < 0:
            raise LongreachError(f"--max-sessions {self.max_sessions} must be 0 or more.")


def served_length(method: Any, model: Any) -> int:
    """The context length a method serves: its own ``served_length(model)`` when it defines
    one, else ``factor`` x the trained length for a method with a scale factor, else the
    trained length. ``--max-model-len`` overrides it (e.g. for the windowed methods, whose
    reach has no fixed bound)."""
    own = getattr(method, "served_length", None)
    if callable(own):
        return int(own(model))
    trained = method.trained_length(model)
    factor = getattr(method, "factor", None)
    if isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor > 1:
        return int(trained * factor)
    return trained


def build_app(config: ServeConfig, model: Any = None, tokenizer: Any = None) -> Any:
    """Load (unless given), apply the method and return the application with its engine."""
    config.validate()
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise LongreachError(
            f"`longreach serve` needs the serve extra ({exc.name} is missing): "
            "pip install 'longreach[serve]'."
        ) from None
    from longreach.bench.plan import canonical_method
    from longreach.methods import build_method
    from longreach.methods.base import CACHE
    from longreach.serve.app import ServeInfo, create_app
    from longreach.serve.engine import Engine

    spec = canonical_method(config.method)
    method = build_method(spec)
    template = None
    if config.chat_template is not None:
        path = Path(config.chat_template).expanduser()
        try:
            template = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise LongreachError(
                f"cannot read the chat template {path} ({exc.strerror or exc})."
            ) from None
    if model is None or tokenizer is None:
        from longreach.models import load

        model, tokenizer = load(config.model, dtype=config.dtype)
    from longreach.extend import extend

    extend(model, spec)  # for the server's lifetime (vanilla installs nothing)
    from longreach.bench.plan import model_trained_length

    max_len = config.max_model_len or served_length(method, model)
    engine = Engine(
        model,
        tokenizer,
        max_model_len=max_len,
        chunk=config.chunk,
        chat_template=template,
        sessions=CACHE in method.touches and config.max_sessions > 0,
        max_sessions=config.max_sessions,
    )
    info = ServeInfo(
        name=config.served_model_name or config.model,
        source=str(getattr(model, "longreach_source", None) or config.model),
        method=spec,
        trained_length=model_trained_length(model),
    )
    return create_app(engine, info, config.max_queue)


def serve(
    config: ServeConfig, on_listen: Callable[[str], None] | None = None, log_level: str = "warning"
) -> None:
    """Serve until interrupted; ``on_listen`` gets the base URL once the socket is bound
    (``--port 0`` binds a free port, and this is how to learn which)."""
    import uvicorn

    app = build_app(config)
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as exc:
        sock.close()
        raise LongreachError(
            f"cannot listen on {config.host}:{config.port} ({exc.strerror or exc}); "
            "pick another --port (0 picks a free one)."
        ) from None
    sock.listen(128)
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2, access_log=False)
    )
    if on_listen is not None:
        host = f"[{config.host}]" if ":" in config.host else config.host
        on_listen(f"http://{host}:{port}")
    try:
        server.run(sockets=[sock])
    finally:
        app.state.worker.close()
        sock.close()
