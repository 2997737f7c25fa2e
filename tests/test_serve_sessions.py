"""Sessions: with a bounded-cache method (StreamingLLM) a conversation keeps its KV cache
between requests, keyed by session_id; the next turn prefills only its new tokens."""

from __future__ import annotations

import httpx
import pytest
from serving import running_server

import longreach as lr

METHOD = "streaming:window=60,sinks=4"


@pytest.fixture(scope="module")
def server():
    with running_server("--model", "lab", "--method", METHOD, "--max-model-len", "2048") as srv:
        yield srv


def _complete(server, **body):
    r = httpx.post(server.base_url + "/completions", json={"model": "lab", "temperature": 0,
                   "return_token_ids": True, **body}, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def test_a_session_feeds_only_the_new_tokens_and_answers_as_a_fresh_request(server):
    _, tok = lr.load("lab")
    info = httpx.get(server.base_url + "/models").json()["data"][0]
    assert info["longreach"]["sessions"] is True and info["max_model_len"] == 2048
    ids = list(
        tok("The grass is green. The sky is blue. The sun is yellow. Here we go.")["input_ids"]
    )
    turn = tok(
        " There and back again. The pass key is 71523. Remember it.", add_special_tokens=False
    )
    extra = list(turn["input_ids"])
    kept = 0
    for step in range(6):  # the conversation grows past the 64-slot cache
        reply = _complete(server, prompt=ids, max_tokens=6, session_id="s1")
        choice = reply["choices"][0]
        cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == kept, f"turn {step}: {cached} tokens reused, expected {kept}"
        fresh = _complete(server, prompt=ids, max_tokens=6)["choices"][0]
        assert choice["text"] == fresh["text"], (
            f"turn {step}: session {choice['text']!r} vs fresh {fresh['text']!r}"
        )
        kept = len(ids) + len(choice["token_ids"]) - 1  # the last token is not fed yet
        ids = ids + choice["token_ids"] + extra
    assert len(ids) > 64 * 2, f"the conversation ({len(ids)} tokens) outgrew the window"


def test_a_prompt_that_does_not_extend_the_session_starts_afresh(server):
    _complete(server, prompt="Once upon a time", max_tokens=3, session_id="s2")
    other = _complete(server, prompt="A different start", max_tokens=3, session_id="s2")
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
