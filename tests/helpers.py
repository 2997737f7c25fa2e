"""Shared test helpers: save a tiny model with an offline tokenizer into a directory."""

from __future__ import annotations

from pathlib import Path

from tiny import tiny_model


def tiny_tokenizer(vocab_size: int = 256):
    """A byte-level BPE tokenizer with no merges (256 byte tokens), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_tokens = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(sorted(byte_tokens))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    assert len(vocab) <= vocab_size
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token=sorted(byte_tokens)[2], pad_token=sorted(byte_tokens)[0]
    )


def save_tiny(path: Path, family: str = "llama", **overrides) -> Path:
    model = tiny_model(family, **overrides)
    model.save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    return path
