"""The GGUF tokenizer rebuild: the pre-tokenizers it knows, and a one-line refusal otherwise."""

from __future__ import annotations

import pytest

from longreach.errors import LongreachError
from longreach.models.gguf_convert import _write_tokenizer


def _tiny_gguf(path, pre: str):
    import gguf

    alphabet = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789") + ["Ġ"]
    tokens = ["<|endoftext|>", *alphabet, "ab", "Ġa"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3] + [1] * (len(tokens) - 1))
    writer.add_token_merges(["a b", "Ġ a"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(str(path))


def test_smollm_pre_tokenizer_splits_digits_one_by_one(tmp_path):
    from transformers import AutoTokenizer

    reader = _tiny_gguf(tmp_path / "smollm.gguf", "smollm")
    _write_tokenizer(reader, {"max_position_embeddings": 64}, tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert tok.tokenize("ab 123") == ["ab", "Ġ", "1", "2", "3"]
    assert tok.eos_token == "<|endoftext|>"


@pytest.mark.parametrize("pre", ["llama3", "qwen2", "deepseek-llm"])
def test_other_pre_tokenizers_are_refused_not_guessed(tmp_path, pre):
    reader = _tiny_gguf(tmp_path / f"{pre}.gguf", pre)
    with pytest.raises(LongreachError) as err:
        _write_tokenizer(reader, {"max_position_embeddings": 64}, tmp_path / "tok")
    assert str(err.value).startswith(
        f"this GGUF's tokenizer uses the {pre!r} pre-tokenizer, which longreach cannot rebuild"
    )
    assert not (tmp_path / "tok").exists()
