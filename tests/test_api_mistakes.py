"""Easy slips with the Python API: one-line errors, and a tokenizer that batches correctly."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

import longreach as lr
from longreach.errors import LongreachError


@pytest.fixture(scope="module")
def lab():
    return lr.load("lab", dtype="fp32")


@pytest.mark.parametrize(
    "thing,message",
    [
        ("lab", "extend needs a torch model (such as longreach.load returns), got 'lab'"),
        (None, "extend needs a torch model (such as longreach.load returns), got None"),
        (3, "extend needs a torch model (such as longreach.load returns), got 3"),
    ],
)
def test_extend_on_something_that_is_not_a_model(thing, message):
    with pytest.raises(LongreachError) as err:
        lr.extend(thing, "yarn")
    assert str(err.value).startswith(message), str(err.value)


def test_extend_on_the_tokenizer_says_to_pass_the_model(lab):
    _, tok = lab
    with pytest.raises(LongreachError) as err:
        lr.extend(tok, "yarn")
    assert str(err.value).startswith("extend got a tokenizer (")
    assert "not the model; pass the model" in str(err.value)


@torch.no_grad()
def test_a_removed_extension_cannot_be_used_again():
    model = tiny_model("llama")
    ids = torch.arange(3, 40)[None]
    before = model(ids).logits
    handle = lr.extend(model, "yarn", factor=4)
    handle.remove()
    with pytest.raises(LongreachError) as err:
        with handle:
            pass
    assert str(err.value) == (
        "this yarn extension was removed and changes nothing any more; apply the method again "
        "with longreach.extend(model, ...)."
    )
    assert torch.equal(model(ids).logits, before)
    with lr.extend(model, "yarn", factor=4) as again:  # a fresh handle works as before
        assert again.active
        assert (model(ids).logits - before).abs().max() > 1e-5


@torch.no_grad()
def test_load_pads_on_the_left_so_a_naive_batch_matches_each_prompt(lab):
    model, tok = lab
    assert tok.padding_side == "left"
    prompts = ["The pass key is 90517. Remember it. " * 3 + "The pass key is", "The sky is"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0, "the shorter row must be padded at its start"
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    for row, prompt in enumerate(prompts):
        alone = tok(prompt, return_tensors="pt")
        want = model.generate(**alone, max_new_tokens=6, do_sample=False)[0, -6:]
        assert out[row, -6:].tolist() == want.tolist(), f"row {row}: {prompt[:20]!r}"
