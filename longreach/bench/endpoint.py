"""``bench --endpoint``: the same grid, run against any OpenAI-compatible server.

Samples are generated exactly as the in-process runner generates them, with the *served*
model's tokenizer when it can be had, so each cell's length is a true token count:

1. ``server``: the server's ``POST /tokenize`` (vLLM's and ``longreach serve``'s shape;
   llama.cpp's ``{"content"}`` shape too). Character offsets, which the haystack needs, come
   from the reply's ``offsets`` (``longreach serve``) or are rebuilt from ``token_strs``
   (byte-level BPE); failing both the haystack is cut at word boundaries, and only the final
   count is the server's;
2. ``local``: ``--tokenizer PATH`` (a local Hugging Face directory or a model alias);
3. ``chars``: lengths in characters, calibrated to tokens by the ``usage.prompt_tokens`` of a
   probe request made of the task's own text.

Each cell records which one it used (``meta.counting``). Every cell is one streamed,
greedy (``temperature`` 0) ``/v1/completions`` request with the sample's prompt text; the
answer is cut where the in-process runner stops decoding (the task says the answer is
complete, or EOS, or the task's token limit), so a greedy server that computes what the
library computes gives the very same cell. Perplexity cells send the token ids with
``echo`` and ``logprobs`` and score the last tokens.

A context-length refusal (vLLM's "maximum context length is N" / "context length is only N",
llama.cpp's ``exceed_context_size_error``) becomes a "too long" cell with no score; a reply
marked ``"truncated": true`` (llama.cpp's context shift: the model did not see the input)
becomes an invalid cell with no score. Requests retry with back-off on 503 (honouring
``Retry-After``) and on dropped connections; a server that does not answer within
``timeout`` seconds, or answers 5xx, raises ``EndpointUnavailable``: the run stops with one
line, or with several URLs the others take its cells (``longreach.bench.endpoint_backend``
runs the grid, through an executor). Only the driver writes the store.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from longreach.bench.grid import BenchConfig
from longreach.bench.plan import ModelFacts, PlannedCell
from longreach.bench.runner import BenchResult, ProgressFn
from longreach.bench.store import Cell
from longreach.errors import LongreachError
from longreach.tasks import PromptFormat, Sample

log = logging.getLogger(__name__)

SERVER, LOCAL, CHARS = "server", "local", "chars"
OK, TOO_LONG, INVALID = "ok", "too_long", "invalid"

_MAX_BACKOFF_S = 8.0
_CONTEXT_WORDINGS = (
    re.compile(r"maximum context length is (\d+)"),  # vLLM <= 0.27, OpenAI
    re.compile(r"context length is only (\d+)"),  # vLLM's current renderer
)


@dataclass
class EndpointConfig:
    url: str  # http://host:port or http://host:port/v1
    served_model: str
    tokenizer: str | None = None  # local tokenizer when the server has no /tokenize
    parallel: int = 1
    timeout: float = 600.0  # seconds without an answer before the run stops

    def validate(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LongreachError(
                f"--endpoint {self.url!r} is not an http(s) URL; write e.g. http://127.0.0.1:8000/v1."
            )
        if self.parallel < 1:
            raise LongreachError(f"--parallel {self.parallel} must be at least 1.")
        if not self.timeout > 0:
            raise LongreachError(f"--timeout {self.timeout} must be a positive number of seconds.")
        if not self.served_model:
            raise LongreachError("--served-model is empty; pass the name the server serves.")


# --------------------------------------------------------------------------- HTTP


class EndpointUnavailable(LongreachError):
    """The server itself failed, not one request: no answer within the timeout after the
    retries, streams that keep breaking, or a 5xx reply. With several ``--endpoint`` URLs the
    cells of a server that fails go to the others."""


class _Retry(Exception):
    def __init__(self, reason: str, wait_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wait_s = wait_s


@dataclass
class Reply:
    status: int
    body: Any  # parsed JSON (or None)
    text: str


class EndpointClient:
    """A small HTTP/JSON client (standard library) with retries and an answer deadline."""

    def __init__(self, url: str, timeout: float = 600.0) -> None:
        parts = urlsplit(url.rstrip("/"))
        self.scheme = parts.scheme
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        path = parts.path.rstrip("/")
        self.root = path.removesuffix("/v1")  # where /tokenize lives
        self.api = self.root + "/v1"
        self.url = f"{parts.scheme}://{parts.netloc}{path}"
        self.timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def _with_retries(self, what: str, attempt: Callable[[], Any]) -> Any:
        started = time.monotonic()
        tries = 0
        while True:
            try:
                return attempt()
            except _Retry as exc:
                elapsed = time.monotonic() - started
                pause = min(_MAX_BACKOFF_S, 0.25 * 2**tries)
                if exc.wait_s is not None:
                    pause = max(pause, min(exc.wait_s, 30.0))
                if elapsed + pause > self.timeout:
                    raise EndpointUnavailable(
                        f"{self.url} did not answer {what} within {self.timeout:g} s "
                        f"({exc.reason}); check that the server runs, or raise --timeout."
                    ) from None
                tries += 1
                log.info("%s: %s; retrying in %.2f s", what, exc.reason, pause)
                time.sleep(pause)

    def _open(self, method: str, path: str, body: Any) -> tuple[Any, http.client.HTTPResponse]:
        conn = self._connection()
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
        except TimeoutError:
            conn.close()
            raise EndpointUnavailable(
                f"{self.url} accepted the connection but sent no answer within "
                f"{self.timeout:g} s; check the server, or raise --timeout."
            ) from None
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            conn.close()
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        if response.status == 503:
            retry_after = response.getheader("Retry-After")
            response.read()
            conn.close()
            try:
                wait_s = float(retry_after) if retry_after else None
            except ValueError:
                wait_s = None
            raise _Retry("503 Service Unavailable", wait_s)
        return conn, response

    def request(self, method: str, path: str, body: Any = None) -> Reply:
        def attempt() -> Reply:
            conn, response = self._open(method, path, body)
            try:
                raw = response.read()
            except TimeoutError:
                raise EndpointUnavailable(
                    f"{self.url} sent no complete answer within {self.timeout:g} s; raise --timeout."
                ) from None
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                raise _Retry(f"{type(exc).__name__}: {exc}") from None
            finally:
                conn.close()
            text = raw.decode("utf-8", "replace")
            try:
                parsed = json.loads(text) if text.strip() else None
            except json.JSONDecodeError:
                parsed = None
            return Reply(response.status, parsed, text)

        return self._with_retries(f"{method} {path}", attempt)

    def stream(self, path: str, body: Any) -> tuple[Reply | None, Iterator[dict[str, Any]]]:
        """POST an SSE request: (the error reply, empty) or (None, the decoded events).

        Retries happen until the server starts answering; a stream cut halfway raises
        ``_Retry`` from the iterator (the caller retries the whole cell).
        """

        def attempt() -> tuple[Reply | None, Any, http.client.HTTPResponse]:
            conn, response = self._open("POST", path, body)
            if response.status != 200:
                text = response.read().decode("utf-8", "replace")
                conn.close()
                try:
                    parsed = json.loads(text)
                except json.JSONDecodeError:
                    parsed = None
                return Reply(response.status, parsed, text), None, response
            return None, conn, response

        error, conn, response = self._with_retries(f"POST {path}", attempt)
        if error is not None:
            return error, iter(())

        def events() -> Iterator[dict[str, Any]]:
            try:
                while True:
                    try:
                        line = response.readline()
                    except TimeoutError:
                        raise EndpointUnavailable(
                            f"{self.url} stopped streaming for {self.timeout:g} s; raise --timeout."
                        ) from None
                    except (ConnectionError, http.client.HTTPException, OSError) as exc:
                        raise _Retry(f"stream cut: {type(exc).__name__}: {exc}") from None
                    if not line:
                        raise _Retry("stream cut before [DONE]")
                    text = line.decode("utf-8", "replace").strip()
                    if not text.startswith("data:"):
                        continue
                    data = text[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        yield json.loads(data)
                    except json.JSONDecodeError:
                        raise _Retry(f"malformed event {data[:80]!r}") from None
            finally:
                conn.close()

        return None, events()


# --------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the printable stand-in of every byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(keep)
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars), strict=True))


_BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}
_SPIECE_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_WORD = re.compile(r"\s*\S+|\s+")


def offsets_from_token_strs(text: str, token_strs: list[str]) -> list[tuple[int, int]] | None:
    """Character (start, end) of each token rebuilt from its token string, for byte-level BPE
    (GPT-2 alphabet) and SentencePiece (``▁`` and ``<0xNN>``); None when they do not spell ``text``."""
    pieces: list[bytes] = []
    for s in token_strs:
        if all(c in _BYTE_OF for c in s):
            pieces.append(bytes(_BYTE_OF[c] for c in s))
        elif (m := _SPIECE_BYTE.match(s)) is not None:
            pieces.append(bytes([int(m.group(1), 16)]))
        else:
            pieces.append(s.replace("\u2581", " ").encode("utf-8"))
    raw = text.encode("utf-8")
    joined = b"".join(pieces)
    lead = 0
    if joined != raw:
        if joined.startswith(b" ") and joined[1:] == raw:  # SentencePiece's dummy prefix
            lead = 1
        else:
            return None
    char_at = [0] * (len(raw) + 2)
    pos = 0
    for i, ch in enumerate(text):
        for _ in range(len(ch.encode("utf-8"))):
            char_at[pos] = i
            pos += 1
    char_at[pos] = char_at[pos + 1] = len(text)
    out, b = [], -lead
    for piece in pieces:
        start, b = max(b, 0), b + len(piece)
        out.append((char_at[start], char_at[max(b, 0)]))
    return out


class ServerTokenizer:
    """The served model's tokenizer, through the server's ``/tokenize`` (results cached)."""

    def __init__(self, client: EndpointClient, model: str, shape: str) -> None:
        self.client = client
        self.model = model
        self.shape = shape  # "vllm" ({"prompt"}) or "llama.cpp" ({"content"})
        self.chat_template = None
        self.offsets_kind = "server"  # how the last offsets were obtained
        self._cache: dict[tuple[str, bool], list[int]] = {}

    @classmethod
    def probe(cls, client: EndpointClient, model: str) -> ServerTokenizer | None:
        for shape in ("vllm", "llama.cpp"):
            tok = cls(client, model, shape)
            try:
                reply = tok._tokenize("test", False, offsets=False)
            except LongreachError:
                raise
            except Exception:  # noqa: BLE001 - any odd reply: this shape is not spoken here
                reply = None
            if reply is not None:
                return tok
        return None

    def _tokenize(self, text: str, special: bool, offsets: bool) -> dict[str, Any] | None:
        if self.shape == "vllm":
            body: dict[str, Any] = {
                "model": self.model,
                "prompt": text,
                "add_special_tokens": special,
            }
            if offsets:
                body["return_offsets"] = True
                body["return_token_strs"] = True
        else:
            body = {"content": text, "add_special": special, "with_pieces": False}
        reply = self.client.request("POST", self.client.root + "/tokenize", body)
        if reply.status != 200 or not isinstance(reply.body, dict):
            return None
        tokens = reply.body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            return None
        return reply.body

    def __call__(
        self,
        text: str,
        add_special_tokens: bool = True,
        return_offsets_mapping: bool = False,
        verbose: bool = False,
    ) -> dict[str, Any]:
        if not return_offsets_mapping:
            key = (text, add_special_tokens)
            if key not in self._cache:
                body = self._tokenize(text, add_special_tokens, offsets=False)
                if body is None:
                    raise LongreachError(f"{self.client.url}/tokenize stopped answering tokens.")
                if len(self._cache) > 4096:
                    self._cache.clear()
                self._cache[key] = list(body["tokens"])
            return {"input_ids": self._cache[key]}
        body = self._tokenize(text, add_special_tokens, offsets=True)
        if body is None:
            raise LongreachError(f"{self.client.url}/tokenize stopped answering tokens.")
        ids = list(body["tokens"])
        offsets = body.get("offsets")
        if isinstance(offsets, list) and len(offsets) == len(ids):
            self.offsets_kind = "server"
            return {"input_ids": ids, "offset_mapping": [tuple(o) for o in offsets]}
        strs = body.get("token_strs")
        rebuilt = offsets_from_token_strs(text, strs) if isinstance(strs, list) else None
        if rebuilt is not None and len(rebuilt) == len(ids):
            self.offsets_kind = "token_strs"
            return {"input_ids": ids, "offset_mapping": rebuilt}
        # Word pieces: the haystack is cut at word boundaries; lengths stay the server's own.
        self.offsets_kind = "words"
        spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
        return {"input_ids": [0] * len(spans), "offset_mapping": spans}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        reply = self.client.request(
            "POST", self.client.root + "/detokenize", {"model": self.model, "tokens": list(ids)}
        )
        if reply.status != 200 or not isinstance(reply.body, dict):
            raise LongreachError(f"{self.client.url}/detokenize failed ({reply.status}).")
        return str(reply.body.get("prompt", reply.body.get("content", "")))


class CharTokenizer:
    """Lengths in characters: ``ceil(chars / chars_per_token)`` "tokens" of text."""

    chat_template = None

    def __init__(self, chars_per_token: float) -> None:
        self.chars_per_token = chars_per_token

    def __call__(
        self,
        text: str,
        add_special_tokens: bool = True,
        return_offsets_mapping: bool = False,
        verbose: bool = False,
    ) -> dict[str, Any]:
        n = math.ceil(len(text) / self.chars_per_token)
        out: dict[str, Any] = {"input_ids": [0] * n}
        if return_offsets_mapping:
            step = self.chars_per_token
            out["offset_mapping"] = [
                (round(i * step), min(len(text), round((i + 1) * step))) for i in range(n)
            ]
        return out

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        raise LongreachError(
            "perplexity over an endpoint needs token ids: the server's /tokenize or --tokenizer."
        )


def load_local_tokenizer(spec: str) -> Any:
    from transformers import AutoTokenizer

    from longreach.models.registry import get_alias

    alias = get_alias(spec)
    path = alias.resolve() if alias is not None else Path(spec).expanduser()
    if not Path(path).is_dir():
        raise LongreachError(
            f"--tokenizer {spec!r} is neither a model alias nor a local directory with a tokenizer."
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers' many reasons, in one line
        raise LongreachError(f"cannot load a tokenizer from {path}: {exc}") from None


# --------------------------------------------------------------------------- one cell


def context_refusal(reply: Reply) -> int | None:
    """The server's context length if ``reply`` refuses a prompt as too long (0 if unnamed)."""
    if reply.status not in (400, 413, 422):
        return None
    error = reply.body.get("error") if isinstance(reply.body, dict) else None
    if isinstance(error, dict) and error.get("type") == "exceed_context_size_error":
        return int(error.get("n_ctx") or 0)
    message = error.get("message", "") if isinstance(error, dict) else ""
    if not message and isinstance(reply.body, dict):
        message = str(reply.body.get("message", ""))  # vLLM <= 0.6: a flat error object
    message = message or reply.text
    for pattern in _CONTEXT_WORDINGS:
        if (m := pattern.search(message)) is not None:
            return int(m.group(1))
    return None


def _server_message(reply: Reply) -> str:
    error = reply.body.get("error") if isinstance(reply.body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return reply.text.strip()[:300] or f"HTTP {reply.status}"


@dataclass
class _Answer:
    status: str
    output: str
    new_tokens: int
    ttft_s: float | None
    decode_s: float | None
    server_prompt_tokens: int | None
    extra: dict[str, Any]


class EndpointBackend:
    """Runs one planned cell against the server and returns its Cell (callable, thread-safe)."""

    def __init__(
        self,
        client: EndpointClient,
        fmt: PromptFormat,
        *,
        served_model: str,
        fingerprint: str,
        method: str,
        counting: str,
        trained_length: int | None,
        max_model_len: int | None,
    ) -> None:
        self.client = client
        self.fmt = fmt
        self.served_model = served_model
        self.fingerprint = fingerprint
        self.method = method
        self.counting = counting
        self.trained_length = trained_length
        self.max_model_len = max_model_len

    def __call__(self, planned: PlannedCell) -> Cell:
        sample = planned.task.generate(
            self.fmt, planned.length, planned.depth, planned.seed, planned.idx
        )
        for attempt in range(4):
            try:
                if sample.metric == "perplexity":
                    answer = self._perplexity(sample)
                else:
                    answer = self._generate(planned, sample)
                break
            except _Retry as exc:  # a stream cut halfway: the whole cell again
                if attempt == 3:
                    raise EndpointUnavailable(
                        f"{self.client.url} kept dropping the stream of {planned.describe()} "
                        f"({exc.reason})."
                    ) from None
                time.sleep(min(_MAX_BACKOFF_S, 0.5 * 2**attempt))
        score = None
        if answer.status == OK:
            score = (
                answer.extra.pop("ppl")
                if sample.metric == "perplexity"
                else float(planned.task.score(sample, answer.output))
            )
        steps = answer.new_tokens - 1
        tokens = sample.n_tokens
        if self.counting == CHARS and answer.server_prompt_tokens:
            tokens = answer.server_prompt_tokens
        facts = ModelFacts(self.served_model, self.fingerprint, self.trained_length)
        return planned.cell(
            facts,
            sample,
            score=score,
            output=answer.output,
            context_tokens=tokens,
            prefill_s=answer.ttft_s,
            decode_s=answer.decode_s if steps > 0 else None,
            new_tokens=answer.new_tokens,
            decode_tok_s=steps / answer.decode_s if steps > 0 and answer.decode_s else None,
            peak_mem_bytes=None,
            mem_kind=None,
            device="endpoint",
            dtype=None,
            meta={
                **sample.meta,
                **answer.extra,
                "status": answer.status,
                "counting": self.counting,
                "endpoint": self.client.url,
                "server_prompt_tokens": answer.server_prompt_tokens,
                "server_max_model_len": self.max_model_len,
            },
        )

    def _refused(self, reply: Reply) -> _Answer:
        limit = context_refusal(reply)
        if limit is None:
            error = EndpointUnavailable if reply.status >= 500 else LongreachError
            raise error(
                f"{self.client.url} refused a request ({reply.status}): {_server_message(reply)}"
            )
        return _Answer(
            TOO_LONG, "", 0, None, None, None,
            {"server_context_length": limit or None, "server_message": _server_message(reply)},
        )  # fmt: skip

    def _generate(self, planned: PlannedCell, sample: Sample) -> _Answer:
        body = {
            "model": self.served_model,
            "prompt": sample.prompt,
            "max_tokens": sample.max_new_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        started = time.perf_counter()
        error, events = self.client.stream(self.client.api + "/completions", body)
        if error is not None:
            return self._refused(error)
        text = ""
        output: str | None = None
        chunks = 0
        counted = 0
        first = last = None
        usage_prompt = None
        truncated = False
        for event in events:
            if "error" in event:
                raise LongreachError(
                    f"{self.client.url} failed mid-stream: {event['error'].get('message', event)}"
                )
            if event.get("truncated") is True:
                truncated = True
            usage = event.get("usage")
            if isinstance(usage, dict) and usage.get("prompt_tokens") is not None:
                usage_prompt = int(usage["prompt_tokens"])
            for choice in event.get("choices") or []:
                chunks += 1
                now = time.perf_counter()
                first = first if first is not None else now
                if output is None:
                    last = now
                    counted = chunks
                    text += choice.get("text") or ""
                    if choice.get("finish_reason") or planned.task.is_complete(sample, text):
                        output = text  # where the in-process runner stops decoding
        output = text if output is None else output
        if truncated:
            return _Answer(INVALID, output, counted, None, None, usage_prompt,
                           {"invalid_reason": "the server truncated the prompt"})  # fmt: skip
        ttft = None if first is None else first - started
        decode = None if first is None or last is None else last - first
        return _Answer(OK, output, counted, ttft, decode, usage_prompt, {})

    def _perplexity(self, sample: Sample) -> _Answer:
        n = int(sample.meta["scored_tokens"])
        body = {
            "model": self.served_model,
            "prompt": list(sample.input_ids),
            "max_tokens": 0,
            "temperature": 0,
            "echo": True,
            "logprobs": 0,
        }
        started = time.perf_counter()
        reply = self.client.request("POST", self.client.api + "/completions", body)
        if reply.status != 200:
            return self._refused(reply)
        try:
            logprobs = reply.body["choices"][0]["logprobs"]["token_logprobs"]
            scored = [float(v) for v in logprobs[-n:]]
        except (KeyError, IndexError, TypeError, ValueError):
            raise LongreachError(
                f"{self.client.url} gave no prompt logprobs (echo with logprobs); "
                "perplexity needs a server that returns them."
            ) from None
        nll = -sum(scored) / len(scored)
        usage = (reply.body or {}).get("usage") or {}
        return _Answer(
            OK, f"nll={nll:.4f}", 0, time.perf_counter() - started, None,
            usage.get("prompt_tokens"), {"nll": nll, "ppl": math.exp(min(nll, 700.0))},
        )  # fmt: skip


# --------------------------------------------------------------------------- the run


@dataclass
class ServerFacts:
    method: str
    trained_length: int | None
    max_model_len: int | None


def server_facts(client: EndpointClient, served_model: str) -> ServerFacts:
    reply = client.request("GET", client.api + "/models")
    if reply.status != 200 or not isinstance(reply.body, dict):
        raise LongreachError(
            f"{client.url}/models answered {reply.status}: is this an OpenAI-compatible server? "
            f"({_server_message(reply)})"
        )
    cards = [c for c in reply.body.get("data") or [] if isinstance(c, dict)]
    names = [str(c.get("id")) for c in cards]
    card = next((c for c in cards if c.get("id") == served_model), None)
    if card is None and names:
        raise LongreachError(
            f"{client.url} serves {', '.join(names)}, not {served_model!r}; pass one of them "
            "to --served-model."
        )
    card = card or {}
    ours = card.get("longreach") if isinstance(card.get("longreach"), dict) else {}
    max_len = card.get("max_model_len") or (card.get("meta") or {}).get("n_ctx_train")
    return ServerFacts(
        method=str(ours.get("method") or "served"),
        trained_length=ours.get("trained_length"),
        max_model_len=int(max_len) if isinstance(max_len, (int, float)) else None,
    )


def _calibrate(
    client: EndpointClient, config: BenchConfig, served_model: str, tasks: list
) -> float:
    """Characters per token of this server, from a probe prompt made of the first task's text."""
    guess = CharTokenizer(4.0)
    fmt = PromptFormat(guess, chat=False)
    target = max(64, min(config.lengths) // 2)
    sample = tasks[0].generate(fmt, target, 0.5, config.seed, 0)
    body = {"model": served_model, "prompt": sample.prompt, "max_tokens": 1, "temperature": 0}
    reply = client.request("POST", client.api + "/completions", body)
    tokens = (
        ((reply.body or {}).get("usage") or {}).get("prompt_tokens")
        if reply.status == 200
        else None
    )
    if not tokens:
        raise LongreachError(
            f"{client.url} has no /tokenize and its probe reply gave no usage.prompt_tokens "
            f"({_server_message(reply) if reply.status != 200 else 'no usage'}); pass --tokenizer PATH."
        )
    return len(sample.prompt) / int(tokens)


def endpoint_fingerprint(served_model: str, method: str, counting: str, tokenizer: Any) -> str:
    """16 hex digits naming (served model, method, counting, tokenizer): a rerun resumes."""
    probe = "The pass key is 12345. Ünïcode, numbers 2048 and\nnew lines."
    ids = (
        [tokenizer.chars_per_token]
        if isinstance(tokenizer, CharTokenizer)
        else list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    )
    blob = json.dumps(["endpoint", served_model, method, counting, ids])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Connection:
    """One server, probed: what it serves and how its cells count tokens."""

    client: EndpointClient
    facts: ServerFacts
    tokenizer: Any
    counting: str  # SERVER, LOCAL or CHARS
    fingerprint: str

    def backend(self, config: BenchConfig, served_model: str) -> EndpointBackend:
        """What runs this server's cells."""
        return EndpointBackend(
            self.client, PromptFormat(self.tokenizer, chat=config.chat),
            served_model=served_model, fingerprint=self.fingerprint, method=self.facts.method,
            counting=self.counting, trained_length=self.facts.trained_length,
            max_model_len=self.facts.max_model_len,
        )  # fmt: skip


def connect(config: BenchConfig, endpoint: EndpointConfig, tasks: list) -> Connection:
    """Probe ``endpoint``: its model card, its tokenizer (``/tokenize``, else ``--tokenizer``,
    else characters calibrated on a probe), and the fingerprint its cells are keyed by."""
    client = EndpointClient(endpoint.url, endpoint.timeout)
    facts = server_facts(client, endpoint.served_model)
    tokenizer: Any = ServerTokenizer.probe(client, endpoint.served_model)
    counting = SERVER
    if tokenizer is None and endpoint.tokenizer:
        tokenizer, counting = load_local_tokenizer(endpoint.tokenizer), LOCAL
    elif tokenizer is None:
        if config.chat:
            raise LongreachError(
                "--chat with --endpoint needs the chat template: pass --tokenizer PATH."
            )
        if any(t.metric == "perplexity" for t in tasks):
            raise LongreachError(
                f"{client.url} has no /tokenize: perplexity needs token ids, pass --tokenizer PATH."
            )
        tokenizer = CharTokenizer(_calibrate(client, config, endpoint.served_model, tasks))
        counting = CHARS
    if config.chat and not getattr(tokenizer, "chat_template", None):
        raise LongreachError(
            "--chat with --endpoint needs a tokenizer with a chat template: pass --tokenizer PATH "
            "(the prompt is rendered here and sent to /v1/completions)."
        )
    fingerprint = endpoint_fingerprint(endpoint.served_model, facts.method, counting, tokenizer)
    return Connection(client, facts, tokenizer, counting, fingerprint)


def run_endpoint_bench(
    config: BenchConfig, endpoint: EndpointConfig, *, progress: ProgressFn | None = None
) -> BenchResult:
    """Run every cell of ``config`` the database lacks against ``endpoint``; like ``run_bench``.

    The one-URL case of ``longreach.bench.endpoint_backend.run_endpoints_bench``.
    """
    from longreach.bench.endpoint_backend import run_endpoints_bench

    return run_endpoints_bench(config, [endpoint], progress=progress)
