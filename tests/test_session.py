"""Session: one conversation in a kept cache; `longreach chat` driven in tmux."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
import torch

import longreach as lr
from longreach import LongreachError


@pytest.fixture(scope="module")
def lab():
    return lr.load("lab")


def test_streaming_session_keeps_a_constant_cache_over_5000_tokens(lab):
    model, tok = lab
    with lr.extend(model, "streaming"):
        chat = lr.Session(model, tok, max_new_tokens=250, stop_at_eos=False)
        sizes = []
        for turn in range(20):
            chat.say(f"turn {turn}: the key is {turn * 7}.")
            sizes.append((chat.cache_tokens, chat.cache_bytes))
    generated = 20 * 250
    assert chat.seen >= generated, f"fed {chat.seen} tokens, expected at least {generated}"
    assert len(set(sizes)) == 1, f"the cache changed size across turns: {sorted(set(sizes))}"
    assert sizes[0][0] <= 256, f"the cache holds {sizes[0][0]} tokens, more than the window"


def test_sirllm_session_stays_within_its_budget_and_ages_scores(lab, monkeypatch):
    from longreach.methods.sirllm import SirLLM

    model, tok = lab
    turns = []
    monkeypatch.setattr(SirLLM, "new_turn", lambda self, cache: turns.append(cache))
    with lr.extend(model, "sirllm:budget=128,decay=0.9"):
        chat = lr.Session(model, tok, max_new_tokens=60, stop_at_eos=False)
        for turn in range(6):
            chat.say(f"remember {turn}")
            assert chat.cache_tokens <= 128, f"turn {turn}: {chat.cache_tokens} tokens held"
    assert len(turns) == 6 and all(c is turns[0] for c in turns), "new_turn once per turn"
    assert chat.seen > 300


def test_turns_feed_exactly_the_conversation_so_far():
    model, tok = lr.load("lab", dtype="fp32")
    fed: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: fed.extend(kwargs["input_ids"][0].tolist()), with_kwargs=True
    )
    try:
        chat = lr.Session(model, tok, max_new_tokens=12)
        first = chat.say("The sky is")
        second = chat.say("The grass is")
    finally:
        hook.remove()
    text = tok.decode(fed)
    want = f"User: The sky is\nAssistant:{first}"
    assert text.startswith(want), f"fed {text!r}, expected it to start with {want!r}"
    # the answer's last token and its closing newline wait to be fed with the next turn
    whole = tok.decode(fed + chat._pending)
    assert whole == f"{want}\nUser: The grass is\nAssistant:{second}\n", whole
    # the cache holds what was fed: the next token's logits equal a fresh prefill of it
    with torch.no_grad():
        fresh = lr.prefill(model, torch.tensor([fed]), chunk=64).logits
    err = float((fresh - chat.state.logits).abs().max())
    assert err < 1e-4, f"kept cache differs from a fresh prefill by {err}"


def test_a_chat_session_needs_a_template(lab):
    model, tok = lab
    with pytest.raises(LongreachError, match="no chat template"):
        lr.Session(model, tok, chat=True)
    with pytest.raises(LongreachError, match="max_new_tokens"):
        lr.Session(model, tok, max_new_tokens=0)


def _pane(name: str) -> str:
    out = subprocess.run(
        ["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True, check=False
    )
    return out.stdout


def _wait(name: str, words: str, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    text = ""
    while time.monotonic() < deadline:
        text = _pane(name)
        if words in text:
            return text
        time.sleep(0.2)
    raise AssertionError(f"{words!r} did not appear in {seconds} s; the pane shows:\n{text}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_longreach_chat_in_tmux(tmp_path):
    name = f"lrchat{time.monotonic_ns()}"
    command = (
        f"{sys.executable} -m longreach chat --model lab --method streaming "
        f"--max-new-tokens 16 --threads 1; echo EXIT=$?; sleep 30"
    )
    subprocess.run(
        ["tmux", "new-session", "-d", "-x", "150", "-y", "40", "-s", name, command], check=True
    )
    try:
        _wait(name, "Ctrl-D quits", 60)
        subprocess.run(["tmux", "send-keys", "-t", name, "The sky is", "Enter"], check=True)
        text = _wait(name, "tokens seen", 60)
        assert "cache" in text and "MiB" in text, text
        subprocess.run(["tmux", "send-keys", "-t", name, "C-d"], check=True)
        text = _wait(name, "EXIT=", 30)
        assert "EXIT=0" in text, text
        assert "Traceback" not in text, text
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], check=False)
