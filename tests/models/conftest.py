"""Fixtures for the model tests: tiny checkpoints on disk (model + tokenizer), as ``from_pretrained`` reads them.

The models come from :mod:`tests.models.tiny` (seeded, 2 layers, hidden 64, vocabulary 128); the tokenizer is a
word-level ``tokenizers`` model over a dozen words wrapped in ``PreTrainedTokenizerFast``, so nothing is
downloaded. Checkpoints are written once per session and shared read-only: a test that needs to change one
copies it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.models.tiny import tiny_model

WORDS = ("the", "cat", "dog", "sat", "on", "a", "mat", "and", "ran", "fast", "hello", "world")


def make_tokenizer(unk: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: ``<unk>``=0, ``<s>``=1, ``</s>``=2 (the tiny configs' ids), then ``WORDS``; no pad
    token. With ``unk=False`` the tokenizer declares no unk token either (only bos/eos)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    specials = {"bos_token": "<s>", "eos_token": "</s>", **({"unk_token": "<unk>"} if unk else {})}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def write_checkpoint(folder: Path, family: str = "llama", pickle: bool = False, unk: bool = True, **overrides) -> Path:
    """Save ``tiny_model(family, **overrides)`` and :func:`make_tokenizer` into ``folder``.

    ``pickle=True`` writes the weights as ``pytorch_model.bin`` (a torch pickle) instead of safetensors.
    """
    model = tiny_model(family, **overrides)
    if pickle:
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)
    make_tokenizer(unk=unk).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """``tiny_checkpoint(family="llama", pickle=False, unk=True, **config_overrides)``: the folder of that
    checkpoint, written once per session."""
    cache: dict[tuple, Path] = {}

    def get(family: str = "llama", pickle: bool = False, unk: bool = True, **overrides) -> Path:
        key = (family, pickle, unk, tuple(sorted(overrides.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{family}-{'bin' if pickle else 'st'}-{'unk' if unk else 'nounk'}")
            cache[key] = write_checkpoint(folder, family, pickle=pickle, unk=unk, **overrides)
        return cache[key]

    return get
