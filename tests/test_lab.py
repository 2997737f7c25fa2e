"""The lab model's data pipeline (Dataset Decomposition), training loop and checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longreach.lab import decomposition as dd

BOS = 1


def test_bucket_lengths_are_powers_of_two():
    assert dd.bucket_lengths(256, 32) == [32, 64, 128, 256]
    with pytest.raises(ValueError):
        dd.bucket_lengths(200, 32)


def test_decompose_keeps_document_order_and_powers_of_two():
    doc = np.arange(10, 10 + 700)
    pieces = dd.decompose(doc, BOS, max_len=256, min_len=32)
    # 700 tokens = 2 x 255 + 127 + 63, each piece led by <s>.
    assert [len(p) for p in pieces] == [256, 256, 128, 64], [len(p) for p in pieces]
    assert all(p[0] == BOS for p in pieces)
    body = np.concatenate([p[1:] for p in pieces])
    assert np.array_equal(body, doc[: len(body)]), (
        "pieces must be consecutive slices of the document"
    )
    assert len(body) == 700
    short = dd.decompose(np.arange(10, 10 + 540), BOS, max_len=256, min_len=32)
    assert [len(p) for p in short] == [256, 256], "a 30-token remainder is dropped"


def test_every_sequence_comes_from_one_document():
    docs = [np.full(300, 100 + i) for i in range(5)]  # each document is one repeated token
    buckets = dd.build_buckets(docs, BOS, 256, 32)
    for rows in buckets.values():
        for row in rows:
            assert len(set(row[1:].tolist())) == 1, "a sequence mixes documents"


def test_dd_batch_fills_a_constant_token_budget():
    docs = [np.arange(2, 2 + n) for n in (40, 70, 140, 300, 600, 1000)]
    buckets = dd.build_buckets(docs, BOS, 256, 32)
    rng = np.random.default_rng(0)
    sizes = {dd.dd_batch(buckets, rng, p, 1024).shape for p in np.linspace(0, 0.99, 40)}
    assert all(b * n == 1024 for b, n in sizes), sizes
    assert len({n for _, n in sizes}) >= 3, f"the curriculum should visit several buckets: {sizes}"


def test_grow_curriculum_moves_from_short_to_long():
    tokens = {32: 1000, 64: 1000, 128: 1000, 256: 1000}
    start = dd.grow_curriculum(tokens, 0.0, cycles=2, sharpness=8.0)
    late = dd.grow_curriculum(tokens, 0.49, cycles=2, sharpness=8.0)
    again = dd.grow_curriculum(tokens, 0.5, cycles=2, sharpness=8.0)
    assert abs(sum(start.values()) - 1) < 1e-9
    assert start[32] / start[256] == pytest.approx(8.0)  # odds x sharpness**(-i / (B - 1))
    assert late[256] > late[32]
    assert again == start, "a new cycle starts from short sequences again"


def test_concat_and_chunk_crosses_documents():
    docs = [np.full(100, 100 + i) for i in range(10)]
    rows = dd.concat_and_chunk(docs, BOS, 256, np.random.default_rng(0))
    assert rows.shape == (1010 // 256, 256)
    assert any(len(set(r.tolist()) - {BOS}) > 1 for r in rows)


# --------------------------------------------------------------------------- copy sequences


def _lab_tokenizer():
    from transformers import AutoTokenizer

    from longreach.lab import CHECKPOINT_DIR

    return AutoTokenizer.from_pretrained(CHECKPOINT_DIR)


@pytest.mark.parametrize("n", [32, 64, 128, 256])
def test_copy_sequences_repeat_their_list_at_every_bucket_length(n):
    from longreach.lab import synthetic

    tok = _lab_tokenizer()
    rng = np.random.default_rng(n)
    ids = synthetic.token_copy_sequence(tok, rng, n)
    again = tok("\nAgain: ", add_special_tokens=False).input_ids
    assert len(ids) == n and ids[0] == tok.bos_token_id
    cut = next(i for i in range(len(ids)) if ids[i : i + len(again)] == again)
    head = len(tok("Repeat the list of words.\n").input_ids)
    body, copy = ids[head:cut], ids[cut + len(again) :]
    assert len(body) >= 4 and copy == body[: len(copy)] and len(copy) >= len(body) - 1
    assert not set(body) & set(tok.all_special_ids)
    assert len(synthetic.number_copy_sequence(tok, rng, n)) == n
    rep = synthetic.repeated_tokens(tok, rng, n)
    period = next(p for p in range(1, n) if rep[1 + p : n] == rep[1 : n - p])
    assert len(rep) == n and n // 4 <= period <= n // 2 and rep[0] == tok.bos_token_id
    kinds = {"of words" in tok.decode(synthetic.copy_sequence(tok, rng, n)) for _ in range(20)}
    assert kinds == {True, False}, "copy_sequence mixes token and number lists"


def test_first_steps_are_copy_sequences_then_decomposition(tmp_path):
    from longreach.lab.train import Batches, Data, TrainConfig

    tok = _lab_tokenizer()
    cfg = TrainConfig(out_dir=tmp_path, steps=10, copy_warmup_steps=3, token_budget=512)
    docs = [np.arange(100, 100 + 700) % 4000 + 10]
    batches = Batches(cfg, Data(tok, docs, [], np.zeros((1, 256), dtype=np.int64)))
    assert batches(0).shape == (512 // 32, 32), "short rows first"
    warm = batches(2)
    assert warm.shape == (512 // 64, 64)
    assert torch.equal(warm, batches(2)), "a step's batch is a pure function of (seed, step)"
    later = batches(3)
    assert later.numel() == 512 and set(later.flatten().tolist()) <= {tok.bos_token_id} | set(
        docs[0].tolist()
    )


# --------------------------------------------------------------------------- training loop


def _tiny_cfg(tmp_path, name):
    from longreach.lab.train import TrainConfig

    return TrainConfig(
        out_dir=tmp_path / name,
        steps=4,
        token_budget=512,
        seq_len=256,
        min_len=64,
        vocab_size=320,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        synthetic_fraction=0.05,
        warmup_steps=1,
        copy_warmup_steps=2,  # steps 0-1 copy sequences, 2-3 Dataset Decomposition
        probe_samples=2,
        checkpoint_every=2,
        eval_every=2,
        eval_windows=2,
        max_text_docs=2,
        threads=1,
    )


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
def test_training_is_deterministic_and_resumes_exactly(tmp_path):
    from longreach.lab.train import train

    first = train(_tiny_cfg(tmp_path, "a"))
    train(_tiny_cfg(tmp_path, "b"))

    def interrupt(info):
        if info.step == 3:  # after the checkpoint of step 2
            raise KeyboardInterrupt

    cfg = _tiny_cfg(tmp_path, "c")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=interrupt)
    resumed = train(cfg)

    a, b, c = (_weights(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a), "same seed, different weights"
    assert all(torch.equal(a[k], c[k]) for k in a), (
        "a resumed run differs from an uninterrupted one"
    )
    assert resumed.tokens == first.tokens == 4 * 512
    assert resumed.val_loss == pytest.approx(first.val_loss, abs=0)


# --------------------------------------------------------------------------- the checkpoint


def test_lab_checkpoint_is_a_small_normal_model_directory():
    from transformers import AutoConfig

    from longreach.lab import CHECKPOINT_DIR

    sizes = {p.name: p.stat().st_size for p in CHECKPOINT_DIR.iterdir() if p.is_file()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert name in sizes, f"{name} missing from {CHECKPOINT_DIR}"
    assert sum(sizes.values()) <= 30 * 2**20, f"checkpoint is {sum(sizes.values())} bytes (> 30 MB)"
    config = AutoConfig.from_pretrained(CHECKPOINT_DIR)
    assert config.model_type == "llama"
    assert config.max_position_embeddings == 256


def test_lab_alias_loads_the_packaged_checkpoint():
    import longreach

    model, tok = longreach.load("lab", dtype="fp32", device="cpu")
    assert model.config.max_position_embeddings == 256
    ids = tok("What is the pass key? The pass key is").input_ids
    assert ids[0] == tok.bos_token_id == 1
    assert model(input_ids=torch.tensor([ids])).logits.shape == (1, len(ids), len(tok))


@pytest.fixture(scope="module")
def lab_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longreach.lab import CHECKPOINT_DIR

    model = AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(CHECKPOINT_DIR)


def test_lab_model_retrieves_the_passkey_at_its_trained_length(lab_model):
    from longreach.lab.evaluate import passkey_accuracy

    model, tok = lab_model
    result = passkey_accuracy(model, tok, 256, samples=20, seed=0)
    assert result.accuracy >= 0.9, f"expected >= 18/20 passkeys at 256 tokens: {result.outputs}"


def test_lab_model_fails_past_its_trained_length_where_methods_help(lab_model):
    """The demo's headline: vanilla retrieves nothing at 2x and 8x; a method does better."""
    from longreach import extend
    from longreach.lab.evaluate import passkey_accuracy

    model, tok = lab_model
    for n in (512, 2048):
        assert passkey_accuracy(model, tok, n, samples=10).accuracy <= 0.1
    with extend(model, "lm-infinite"):
        assert passkey_accuracy(model, tok, 512, samples=10).accuracy >= 0.3
