"""`longreach serve` with the lab model, driven by the official `openai` client.

One real server process for the module (127.0.0.1, a free port, --max-queue 8). Greedy
answers are checked against the library's own prefill + greedy in this process.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from serving import CHAT_TEMPLATE, running_server

import longreach as lr

PASSKEY = (
    "There is a pass key hidden in this text. The pass key is 48213. Remember it. The pass key is"
)
PROMPTS = [
    PASSKEY,
    "The grass is green. The sky is blue. The sun is",
    "Once upon a time, there was a",
    "1 2 3 4 5 6 7",
    "The pass key is 90417. Remember it. What is the pass key? The pass key is",
]


@pytest.fixture(scope="module")
def lab():
    model, tok = lr.load("lab")
    return model, tok


@pytest.fixture(scope="module")
def server():
    with running_server(
        "--model", "lab", "--max-queue", "8", "--chat-template", str(CHAT_TEMPLATE)
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def greedy_reference(lab, ids: list[int], max_tokens: int) -> tuple[str, list[int]]:
    model, tok = lab
    torch.set_num_threads(1)
    state = lr.prefill(model, torch.tensor([ids]))
    out = lr.greedy(model, state, max_tokens, eos_token_id=tok.eos_token_id)[0].tolist()
    return tok.decode(out, skip_special_tokens=True), out


def encode(lab, text: str, special: bool = True) -> list[int]:
    return list(lab[1](text, add_special_tokens=special)["input_ids"])


def render_chat(messages) -> str:
    lines = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return lines + "assistant:"


# --------------------------------------------------------------------------- information


def test_models_lists_the_served_length(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["lab"], f"expected one model 'lab', got {models}"
    extra = models[0].model_dump()
    assert extra["max_model_len"] == 256, f"vanilla lab serves 256 tokens, got {extra}"
    assert extra["longreach"]["method"] == "vanilla"


def test_health_version_and_tokenizer_endpoints(server, lab):
    h = httpx.get(server.url + "/health")
    assert (h.status_code, h.text) == (200, ""), f"/health: {h.status_code} {h.text!r}"
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "</s>", f"tokenizer_info: {info}"
    assert info["chat_template"] == CHAT_TEMPLATE.read_text(), "the --chat-template file"
    tok = httpx.post(
        server.url + "/tokenize", json={"prompt": "test", "add_special_tokens": False}
    ).json()
    assert tok == {"count": len(encode(lab, "test", False)), "max_model_len": 256,
                   "tokens": encode(lab, "test", False)}, tok  # fmt: skip
    with_bos = httpx.post(server.url + "/tokenize", json={"prompt": PASSKEY}).json()
    assert with_bos["tokens"] == encode(lab, PASSKEY), "add_special_tokens defaults to true"
    back = httpx.post(server.url + "/detokenize", json={"tokens": encode(lab, "test", False)})
    assert back.json() == {"prompt": "test"}, back.text
    chat = httpx.post(
        server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}
    ).json()
    assert chat["tokens"] == encode(lab, "user: hi\nassistant:", False), chat


# --------------------------------------------------------------------------- completions


def test_completion_is_the_library_greedy_answer(client, lab):
    ids = encode(lab, PASSKEY)
    expected, tokens = greedy_reference(lab, ids, 10)
    reply = client.completions.create(model="lab", prompt=PASSKEY, max_tokens=10, temperature=0)
    choice = reply.choices[0]
    assert choice.text == expected, f"served {choice.text!r}, library greedy {expected!r}"
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == len(tokens)
    assert choice.finish_reason == ("stop" if tokens[-1] == lab[1].eos_token_id else "length")


def test_token_list_prompts_and_prompt_lists(client, lab):
    texts = PROMPTS[:3]
    expected = [greedy_reference(lab, encode(lab, t), 6)[0] for t in texts]
    ids = [encode(lab, t) for t in texts]
    one = client.completions.create(model="lab", prompt=ids[0], max_tokens=6, temperature=0)
    assert one.choices[0].text == expected[0], "a token-list prompt reads the same tokens"
    for prompt in (texts, ids):
        many = client.completions.create(model="lab", prompt=prompt, max_tokens=6, temperature=0)
        got = sorted((c.index, c.text) for c in many.choices)
        assert got == list(enumerate(expected)), f"{type(prompt[0]).__name__} prompts: {got}"
        assert many.usage.prompt_tokens == sum(len(i) for i in ids)


def test_echo_with_logprobs_matches_the_model(client, lab):
    model, tok = lab
    ids = encode(lab, PROMPTS[1])
    reply = client.completions.create(
        model="lab", prompt=ids, max_tokens=2, temperature=0, echo=True, logprobs=3
    )
    choice = reply.choices[0]
    lp = choice.logprobs
    gen_text, gen = greedy_reference(lab, ids, 2)
    assert choice.text == tok.decode(ids) + gen_text, f"echo text: {choice.text!r}"
    assert len(lp.tokens) == len(ids) + len(gen), f"{len(lp.tokens)} logprob entries"
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        logits = model(torch.tensor([ids + gen[:-1]])).logits[0].float()
    ref = torch.log_softmax(logits, -1)
    targets = ids[1:] + gen
    for pos, target in enumerate(targets):
        got = lp.token_logprobs[pos + 1]
        want = float(ref[pos, target])
        assert math.isclose(got, want, abs_tol=1e-3), f"position {pos + 1}: {got} vs {want}"
        top = lp.top_logprobs[pos + 1]
        assert 3 <= len(top) <= 4, f"top-3 alternatives plus the chosen token, got {top}"
        assert math.isclose(max(top.values()), float(ref[pos].max()), abs_tol=1e-3)
    assert lp.text_offset[:3] == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    # lm-eval's loglikelihood call: echo with max_tokens=0 scores the prompt only
    score = client.completions.create(
        model="lab", prompt=ids, max_tokens=0, temperature=0, echo=True, logprobs=1
    )
    assert score.choices[0].logprobs.token_logprobs == lp.token_logprobs[: len(ids)]


def test_generated_logprobs_without_echo(client, lab):
    ids = encode(lab, PROMPTS[2])
    reply = client.completions.create(
        model="lab", prompt=ids, max_tokens=4, temperature=0, logprobs=0
    )
    lp = reply.choices[0].logprobs
    text, gen = greedy_reference(lab, ids, 4)
    assert len(lp.token_logprobs) == len(gen) and all(v <= 0 for v in lp.token_logprobs)
    assert "".join(lp.tokens) == lab[1].decode(gen, skip_special_tokens=False)


def test_sampling_seed_top_p_n_and_stop(client, lab):
    args = dict(model="lab", prompt=PROMPTS[2], max_tokens=12, temperature=1.0)
    a = client.completions.create(seed=7, **args).choices[0].text
    b = client.completions.create(seed=7, **args).choices[0].text
    assert a == b, f"same seed, different texts: {a!r} vs {b!r}"
    texts = {client.completions.create(seed=s, **args).choices[0].text for s in range(6)}
    assert len(texts) >= 2, f"six seeds at temperature 1 gave one text: {texts}"
    greedy_text = greedy_reference(lab, encode(lab, PROMPTS[2]), 12)[0]
    narrow = client.completions.create(seed=3, top_p=1e-6, **args).choices[0].text
    assert narrow == greedy_text, "top_p that keeps one token is greedy"
    n3 = client.completions.create(n=3, seed=1, **args)
    assert sorted(c.index for c in n3.choices) == [0, 1, 2]
    assert n3.usage.prompt_tokens == len(encode(lab, PROMPTS[2])), "n counts the prompt once"
    # stop: cut before the first occurrence, finish_reason stop
    stop = greedy_text.strip()[2:5]
    assert stop, f"greedy text too short to pick a stop string: {greedy_text!r}"
    cut = client.completions.create(model="lab", prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                    stop=[stop, "@@@"])  # fmt: skip
    c = cut.choices[0]
    assert c.text == greedy_text[: greedy_text.index(stop)], f"stopped text {c.text!r}"
    assert c.finish_reason == "stop" and c.model_dump()["stop_reason"] == stop


# --------------------------------------------------------------------------- chat


def test_chat_uses_the_chat_template(client, lab):
    messages = [{"role": "user", "content": "The pass key is 48213. What is the pass key?"}]
    ids = encode(lab, render_chat(messages), special=False)
    expected = greedy_reference(lab, ids, 8)[0]
    reply = client.chat.completions.create(model="lab", messages=messages, max_tokens=8,
                                           temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    msg = reply.choices[0]
    assert msg.message.role == "assistant" and msg.message.content == expected
    assert reply.usage.prompt_tokens == len(ids)
    assert len(msg.logprobs.content) == reply.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in msg.logprobs.content)


# --------------------------------------------------------------------------- streaming


def test_streamed_completion_equals_the_whole_one(client, lab):
    args = dict(model="lab", prompt=PASSKEY, max_tokens=10, temperature=0)
    whole = client.completions.create(**args)
    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **args)
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text, f"stream {text!r} vs whole {whole.choices[0].text!r}"
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [whole.choices[0].finish_reason], f"one final chunk, got {finals}"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    # the same with a stop string: the streamed text never shows it
    stop = whole.choices[0].text.strip()[1:4]
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(stream=True, stop=[stop], **args)
        if c.choices
    )
    stopped = client.completions.create(stop=[stop], **args).choices[0].text
    assert streamed == stopped and stop not in streamed, f"{streamed!r} vs {stopped!r}"


def test_streamed_chat_and_raw_sse_framing(client, server):
    messages = [{"role": "user", "content": "Say something."}]
    args = dict(model="lab", messages=messages, max_tokens=6, temperature=0)
    whole = client.chat.completions.create(**args).choices[0].message.content
    parts = list(client.chat.completions.create(stream=True, **args))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole
    with httpx.stream("POST", server.base_url + "/chat/completions",
                      json={**args, "stream": True}) as r:  # fmt: skip
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], f"stream must end with [DONE]: {events[-3:]}"
    assert all(e.startswith("data: {") for e in events[:-2]), "every event is one data: line"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_client_disconnect_cancels_generation(server, lab):
    def metric(name: str) -> float:
        text = httpx.get(server.url + "/metrics").text
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        assert match, f"{name} missing from /metrics"
        return float(match.group(1))

    before_cancel = metric("longreach_cancelled_requests_total")
    before_tokens = metric("longreach_generation_tokens_total")
    body = {"model": "lab", "prompt": "Once", "max_tokens": 240, "temperature": 1.0, "seed": 0,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", server.base_url + "/completions", json=body) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n >= 6:
                break
    deadline = time.monotonic() + 20
    while metric("longreach_cancelled_requests_total") == before_cancel:
        assert time.monotonic() < deadline, "the server never noticed the client left"
        time.sleep(0.1)
    generated = metric("longreach_generation_tokens_total") - before_tokens
    assert generated < 240, (
        f"the generation ran to the end ({generated} tokens) after the client left"
    )


# --------------------------------------------------------------------------- errors


def _error(exc: openai.APIStatusError) -> dict:
    return exc.response.json()["error"]


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [99999]}, "prompt"),
        ({"stream_options": {"include_usage": True}}, None),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_fields_are_400_not_422(server, fields, param):
    body = {"model": "lab", "prompt": "hi", "max_tokens": 2, **fields}
    r = httpx.post(server.base_url + "/completions", json=body)
    assert r.status_code == 400, f"{fields}: {r.status_code} {r.text}"
    err = r.json()["error"]
    assert err["type"] == "BadRequestError" and err["code"] == 400 and err["message"], err
    if param is not None:
        assert err["param"] == param, f"{fields}: param {err['param']!r}"


def test_malformed_bodies_are_400(server):
    for content in (b"not json", b'{"prompt": "x"', b"[]"):
        r = httpx.post(server.base_url + "/completions", content=content,
                       headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code == 400 and "error" in r.json(), (
            f"{content!r}: {r.status_code} {r.text}"
        )
    r = httpx.post(server.base_url + "/completions", json={"model": "lab"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    r = httpx.post(server.base_url + "/chat/completions", json={"model": "lab", "messages": []})
    assert r.status_code == 400, r.text


def test_unknown_model_and_route_are_404(client, server):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=2)
    err = _error(info.value)
    assert err == {"message": "The model `gpt-9` does not exist.", "type": "NotFoundError",
                   "param": "model", "code": 404}, err  # fmt: skip
    r = httpx.get(server.url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError", r.text


def test_context_length_refusal_in_vllm_wording(client, lab):
    long_prompt = " ".join(["word"] * 300)
    n = len(encode(lab, long_prompt))
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="lab", prompt=long_prompt, max_tokens=5)
    err = _error(info.value)
    assert err["message"] == (
        f"You passed {n} input tokens and requested 5 output tokens. However, the model's "
        "context length is only 256 tokens, resulting in a maximum input length of 251 tokens. "
        "Please reduce the length of the input prompt."
    ), err["message"]
    assert err["param"] == "input_tokens" and err["code"] == 400
    fits = len(encode(lab, PASSKEY))
    with pytest.raises(openai.BadRequestError):  # the prompt fits, prompt + max_tokens does not
        client.completions.create(model="lab", prompt=PASSKEY, max_tokens=257 - fits)
    ok = client.completions.create(
        model="lab", prompt=PASSKEY, max_tokens=256 - fits, temperature=0
    )
    assert ok.usage.total_tokens <= 256
    with pytest.raises(openai.BadRequestError) as chat_info:
        client.chat.completions.create(
            model="lab", messages=[{"role": "user", "content": long_prompt}]
        )
    assert "context length is only 256" in _error(chat_info.value)["message"]


# --------------------------------------------------------------------------- load


def test_load_50_requests_10_clients_bounded_queue(server, client, lab):
    expected = {p: greedy_reference(lab, encode(lab, p), 8)[0] for p in PROMPTS}
    first = client.completions.create(model="lab", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert first.choices[0].text == expected[PROMPTS[0]]
    rss_first = server.rss_bytes()
    results: list[tuple[int, str, str]] = []
    lock = threading.Lock()
    jobs = iter(range(50))

    def client_loop(worker: int) -> None:
        http = httpx.Client(timeout=60)
        while True:
            with lock:
                i = next(jobs, None)
            if i is None:
                return
            prompt = PROMPTS[i % len(PROMPTS)]
            stream = i % 5 == 4
            body = {"model": "lab", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                    "stream": stream}  # fmt: skip
            r = http.post(server.base_url + "/completions", json=body)
            if r.status_code == 200 and stream:
                text = "".join(
                    json.loads(line[6:])["choices"][0]["text"]
                    for line in r.text.split("\n\n")
                    if line.startswith("data: {")
                )
            elif r.status_code == 200:
                text = r.json()["choices"][0]["text"]
            else:
                text = r.headers.get("retry-after", "") + "|" + r.text
            with lock:
                results.append((r.status_code, prompt, text))

    started = time.monotonic()
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(client_loop, range(10), timeout=240))
    elapsed = time.monotonic() - started
    assert len(results) == 50, f"{len(results)} of 50 requests answered"
    statuses = sorted({s for s, _, _ in results})
    assert set(statuses) <= {200, 503}, (
        f"statuses {statuses}: {[r for r in results if r[0] not in (200, 503)]}"
    )
    for status, prompt, text in results:
        if status == 200:
            assert text == expected[prompt], f"{prompt!r}: {text!r} != {expected[prompt]!r}"
        else:
            retry, _, body = text.partition("|")
            assert retry == "1" and json.loads(body)["error"]["type"] == "ServiceUnavailableError"
    assert sum(s == 200 for s, _, _ in results) >= 9, "at least the queue's worth succeeded"
    rss_after = server.rss_bytes()
    assert rss_after <= 1.1 * rss_first, (
        f"server RSS grew from {rss_first / 2**20:.0f} MiB to {rss_after / 2**20:.0f} MiB"
    )
    assert elapsed < 240


def test_full_queue_answers_503_with_retry_after(server):
    body = {"model": "lab", "prompt": "Once", "max_tokens": 200, "temperature": 1.0, "seed": 1}
    statuses: list[tuple[int, str | None]] = []
    # all 14 post together: on a loaded machine, threads that start late could otherwise find
    # the first requests already answered and the queue free again
    together = threading.Barrier(14)

    def one(_: int) -> None:
        together.wait(timeout=60)
        r = httpx.post(server.base_url + "/completions", json=body, timeout=120)
        statuses.append((r.status_code, r.headers.get("retry-after")))

    with ThreadPoolExecutor(14) as pool:
        list(pool.map(one, range(14), timeout=200))
    codes = sorted(s for s, _ in statuses)
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 14 - 9, f"9 fit (1 running + 8 waiting); got {codes}"
    assert all(h == "1" for s, h in statuses if s == 503)


def test_sessions_need_a_bounded_cache_method(server):
    r = httpx.post(server.base_url + "/completions",
                   json={"model": "lab", "prompt": "hi", "max_tokens": 2, "session_id": "a"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "session_id", r.text
    assert "--method streaming" in r.json()["error"]["message"]
