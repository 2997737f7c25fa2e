"""`bench --endpoint`: against a real `longreach serve` (agreement with the in-process bench)
and against a small llama.cpp-like fake server (no /tokenize, refusals, truncation, retries)."""

from __future__ import annotations

import json
import math
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from serving import running_server
from typer.testing import CliRunner

import longreach as lr
from longreach.bench import BenchConfig, ResultStore, run_bench
from longreach.bench.endpoint import (
    CHARS,
    SERVER,
    EndpointConfig,
    Reply,
    context_refusal,
    offsets_from_token_strs,
    run_endpoint_bench,
)
from longreach.cli import app
from longreach.errors import LongreachError

LENGTHS = [128, 200, 256]


@pytest.fixture(scope="module")
def server():
    with running_server("--model", "lab", "--max-queue", "0") as srv:
        yield srv


def _cells(db):
    with ResultStore(db, create=False) as store:
        return {(c.task.split(":")[0], c.length, c.depth, c.idx): c for c in store.iter_cells()}


def _config(db, **kw) -> BenchConfig:
    args = dict(model="lab", tasks=["passkey", "perplexity:last=32,haystack=synthetic"],
                lengths=LENGTHS, depths=[0.25, 0.75], samples=2, db=str(db))  # fmt: skip
    args.update(kw)
    return BenchConfig(**args)


# --------------------------------------------------------------------------- agreement


def test_endpoint_bench_agrees_with_the_in_process_bench(server, tmp_path):
    model, tok = lr.load("lab")
    run_bench(_config(tmp_path / "local.db"), model=model, tokenizer=tok)
    result = run_endpoint_bench(
        _config(tmp_path / "served.db"), EndpointConfig(server.url, "lab", parallel=1)
    )
    local, served = _cells(tmp_path / "local.db"), _cells(tmp_path / "served.db")
    assert set(local) == set(served) and len(served) == result.total == 18
    for key, want in local.items():
        got = served[key]
        assert got.meta["counting"] == SERVER and got.prompt == want.prompt, key
        assert got.context_tokens == want.context_tokens, f"{key}: token counts differ"
        if want.context_tokens + (want.new_tokens or 0) > 256 and got.metric == "accuracy":
            # the server serves 256 tokens: prompt + max_tokens does not fit
            assert got.score is None and got.meta["status"] == "too_long", f"{key}: {got.meta}"
            assert got.meta["server_context_length"] == 256
            continue
        assert got.meta["status"] == "ok", f"{key}: {got.meta}"
        if got.metric == "perplexity":
            # The runner scores in two passes (prefix cached), the server in one: in fp32 the
            # lab model's NLL differs by up to 2.2e-3 between them (in fp64 both give 0.121107
            # at 256 tokens), so this is float noise, not a different computation.
            assert abs(got.meta["nll"] - want.meta["nll"]) < 5e-3, (
                f"{key}: nll {got.meta} vs {want.meta}"
            )
        else:
            assert (got.score, got.output, got.new_tokens) == (
                want.score,
                want.output,
                want.new_tokens,
            ), (
                f"{key}: served {got.output!r} ({got.score}), in-process {want.output!r} ({want.score})"
            )
    refused = [k for k, c in served.items() if c.meta["status"] == "too_long"]
    assert refused and all(k[1] == 256 for k in refused), f"too-long cells: {refused}"
    # resumable: the same command computes nothing; --parallel gives the same cells
    again = run_endpoint_bench(_config(tmp_path / "served.db"), EndpointConfig(server.url, "lab"))
    assert (again.computed, again.skipped) == (0, 18)
    run_endpoint_bench(
        _config(tmp_path / "parallel.db"), EndpointConfig(server.url, "lab", parallel=3)
    )
    par = _cells(tmp_path / "parallel.db")
    assert {k: (c.score, c.output) for k, c in par.items()} == {
        k: (c.score, c.output) for k, c in served.items()
    }, "--parallel 3 (with 503s from --max-queue 0, retried) gives the sequential cells"


def test_cli_bench_endpoint(server, tmp_path):
    db = tmp_path / "cli.db"
    args = ["bench", "--endpoint", server.base_url, "--served-model", "lab", "--task", "passkey",
            "--lengths", "128", "--samples", "1", "--db", str(db)]  # fmt: skip
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "1 cells computed" in out.output
    bad = CliRunner().invoke(app, [*args[:3], "--served-model", "gpt-9", *args[5:]])
    assert bad.exit_code == 2 and "serves lab, not 'gpt-9'" in bad.output, bad.output
    assert "Traceback" not in bad.output


# --------------------------------------------------------------------------- a llama.cpp-like fake


class FakeState:
    def __init__(self) -> None:
        self.drop = 0  # completion requests to drop without an answer
        self.busy = 0  # completion requests to answer 503
        self.completions = 0
        self.n_ctx = 300
        self.truncate_above = 200


def _fake_handler(state: FakeState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _json(self, status, body, headers=()):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/v1/models":
                return self._json(200, {"object": "list", "data": [{"id": "fake"}]})
            self._json(
                404,
                {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}},
            )

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/completions":
                return self._json(404, {"error": {"code": 404, "message": "File Not Found",
                                                  "type": "not_found_error"}})  # fmt: skip
            state.completions += 1
            if state.drop > 0:
                state.drop -= 1
                self.close_connection = True
                return
            if state.busy > 0:
                state.busy -= 1
                return self._json(
                    503, {"error": {"code": 503, "message": "busy"}}, [("Retry-After", "0")]
                )
            prompt = body["prompt"]
            n = math.ceil(len(prompt) / 3)
            if n > state.n_ctx:
                return self._json(400, {"error": {
                    "code": 400, "type": "exceed_context_size_error", "n_prompt_tokens": n,
                    "n_ctx": state.n_ctx,
                    "message": f"request ({n} tokens) exceeds the available context size "
                               f"({state.n_ctx} tokens), try increasing it"}})  # fmt: skip
            match = re.search(r"pass key is (\d{5})", prompt)
            answer = f" {match.group(1) if match else '00000'}.\nMore text"
            usage = {
                "prompt_tokens": n,
                "completion_tokens": len(answer),
                "total_tokens": n + len(answer),
            }
            if not body.get("stream"):
                return self._json(
                    200, {"choices": [{"index": 0, "text": answer[:1]}], "usage": usage}
                )
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for i, ch in enumerate(answer):
                last = i == len(answer) - 1
                chunk = {"choices": [{"index": 0, "text": ch,
                                      "finish_reason": "length" if last else None}]}  # fmt: skip
                if last and n > state.truncate_above:
                    chunk["truncated"] = True
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

    return Handler


@pytest.fixture
def fake():
    state = FakeState()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _fake_handler(state))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", state
    httpd.shutdown()
    httpd.server_close()


def test_characters_calibrated_refusals_truncation_and_retries(fake, tmp_path):
    url, state = fake
    state.drop, state.busy = 2, 2
    config = BenchConfig(model="fake", tasks=["passkey"], lengths=[150, 250, 400], samples=2,
                         db=str(tmp_path / "fake.db"))  # fmt: skip
    result = run_endpoint_bench(config, EndpointConfig(url, "fake", timeout=30))
    cells = _cells(tmp_path / "fake.db")
    assert result.computed == 6 and state.drop == 0 and state.busy == 0
    for (_, length, _, _), cell in cells.items():
        assert cell.meta["counting"] == CHARS
        n = cell.context_tokens
        if length == 400:
            assert cell.meta["status"] == "too_long" and cell.score is None
            assert cell.meta["server_context_length"] == 300
            continue
        assert cell.meta["server_prompt_tokens"] == n, "the server's own count is recorded"
        assert abs(n - length) <= max(3, length // 20), f"calibrated length {n} for {length}"
        if n > state.truncate_above:
            assert cell.meta["status"] == "invalid" and cell.score is None, cell.meta
        else:
            assert cell.meta["status"] == "ok" and cell.score == 1.0, (cell.output, cell.meta)
            assert cell.output == f" {cell.expected[0]}.", "cut where the runner stops"
    statuses = sorted(c.meta["status"] for c in cells.values())
    assert statuses == ["invalid", "invalid", "ok", "ok", "too_long", "too_long"], statuses


def test_a_server_that_never_answers_is_one_line_after_the_timeout(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        config = BenchConfig(model="x", tasks=["passkey"], lengths=[128], db=str(tmp_path / "x.db"))
        with pytest.raises(LongreachError, match=r"no answer within 1 s") as info:
            run_endpoint_bench(config, EndpointConfig(f"http://127.0.0.1:{port}", "x", timeout=1))
        assert "\n" not in str(info.value)
    finally:
        listener.close()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens: connections are refused, retried, then one line
    with pytest.raises(LongreachError, match=r"did not answer GET /v1/models within 1 s"):
        run_endpoint_bench(config, EndpointConfig(f"http://127.0.0.1:{port}", "x", timeout=1))


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "status, body, limit",
    [
        (
            400,
            {
                "error": {
                    "message": "This model's maximum context length is 4096 tokens. However, "
                    "you requested 5000 tokens (4990 in the messages, 10 in the completion).",
                    "type": "BadRequestError",
                    "code": 400,
                }
            },
            4096,
        ),  # fmt: skip
        (
            400,
            {
                "object": "error",
                "message": "This model's maximum context length is 2048 tokens. "
                "However, you requested 9 output tokens and your prompt contains at least 2100 "
                "input tokens",
                "type": "BadRequestError",
                "code": 400,
            },
            2048,
        ),  # fmt: skip
        (
            400,
            {
                "error": {
                    "message": "You passed 300 input tokens and requested 10 output tokens. "
                    "However, the model's context length is only 256 tokens, resulting in a "
                    "maximum input length of 246 tokens.",
                    "code": 400,
                }
            },
            256,
        ),  # fmt: skip
        (
            400,
            {
                "error": {
                    "code": 400,
                    "type": "exceed_context_size_error",
                    "n_ctx": 8192,
                    "message": "request (13392 tokens) exceeds the available context size",
                }
            },
            8192,
        ),  # fmt: skip
        (400, {"error": {"message": "temperature must be <= 2", "code": 400}}, None),
        (500, {"error": {"message": "maximum context length is 10"}}, None),
    ],
)
def test_context_refusal_wordings(status, body, limit):
    assert context_refusal(Reply(status, body, json.dumps(body))) == limit


def test_offsets_rebuilt_from_byte_level_token_strings():
    _, tok = lr.load("lab")
    text = "The pass key is 48213. Ünïcode ✓ and\nnew lines."
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    strs = tok.convert_ids_to_tokens(enc["input_ids"])
    rebuilt = offsets_from_token_strs(text, strs)
    assert rebuilt is not None and len(rebuilt) == len(strs)
    assert [s for s, _ in rebuilt] == [s for s, _ in enc["offset_mapping"]], "token starts"
    assert offsets_from_token_strs("other text", strs) is None
