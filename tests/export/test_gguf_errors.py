"""Bad input is refused before anything is written, with a message that says what to do; exports are atomic.

Every refusal is checked to leave the destination untouched (no folder created, no file in it), and an
export interrupted in the middle of a file leaves neither the file nor its temporary.
"""

from __future__ import annotations

import sys

import peft
import pytest
import torch

from fastft.export import UnsupportedModelError, UnsupportedTokenizerError, save_pretrained_gguf
from fastft.export import gguf as export_gguf
from fastft.export.merge import merged_state_dict
from tests.export.tokenizers_local import byte_level
from tests.models.conftest import make_tokenizer
from tests.models.tiny import TEXT_VOCAB, lora_config, tiny_model


def _llama(**overrides):
    return tiny_model(
        "llama", **{**TEXT_VOCAB, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, **overrides}
    )


def test_unknown_method_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="q4_k_m") as info:
        save_pretrained_gguf(_llama(), byte_level(), tmp_path / "out", "q4_kk")
    assert "'q4_kk'" in str(info.value) and "f16" in str(info.value) and "q8_0" in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", ["gpt_neox", "mixtral"])
def test_unsupported_architecture_before_writing(model_type, tmp_path):
    import transformers

    from fastft.models.tiny_configs import tiny_config

    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type))
    with pytest.raises(UnsupportedModelError, match=f"model type '{model_type}'.*Supported: gemma"):
        save_pretrained_gguf(model, byte_level(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_tokenizer_before_writing(tmp_path):
    model = tiny_model("llama", vocab_size=128)
    with pytest.raises(UnsupportedTokenizerError, match="WordLevel"):
        save_pretrained_gguf(model, make_tokenizer(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_larger_than_embedding(tmp_path):
    with pytest.raises(UnsupportedTokenizerError, match="resize_token_embeddings"):
        save_pretrained_gguf(_llama(vocab_size=1000), byte_level(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_files_are_not_overwritten(tmp_path):
    model, tokenizer = _llama(), byte_level()
    out = tmp_path / "out"
    out.mkdir()
    (out / "out.F16.gguf").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained_gguf(model, tokenizer, out, "f16", progress=False)
    assert (out / "out.F16.gguf").read_bytes() == b"mine" and sorted(p.name for p in out.iterdir()) == ["out.F16.gguf"]
    paths = save_pretrained_gguf(model, tokenizer, out, "f16", overwrite=True, progress=False)
    assert (out / "out.F16.gguf").stat().st_size > 1000 and len(paths) == 2


def test_missing_llama_cpp_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(ImportError, match=r'pip install "fastft\[gguf\]"'):
        save_pretrained_gguf(_llama(), byte_level(), tmp_path / "out", ["f16", "q4_k_m"])
    assert not (tmp_path / "out").exists()


def test_interrupted_export_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    calls = []
    real = export_gguf._Plan.transform

    def failing(self, name, gguf_name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, name, gguf_name, tensor)

    monkeypatch.setattr(export_gguf._Plan, "transform", failing)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained_gguf(_llama(), byte_level(), tmp_path / "out", "q8_0", progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_dora_is_refused_with_the_way_out(tmp_path):
    model = peft.get_peft_model(_llama(), lora_config("llama", use_dora=True))
    with pytest.raises(NotImplementedError, match="merge_and_unload"):
        save_pretrained_gguf(model, byte_level(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merge_equals_peft_with_modules_to_save_and_merged_adapters():
    base = _llama()
    config = lora_config("llama", modules_to_save=["lm_head"])
    config.target_modules = {*config.target_modules, "embed_tokens"}  # an Embedding LoRA too
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    ours = merged_state_dict(model)
    import copy

    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6, msg=name)
    model.merge_adapter()  # merged in place: the adapter is not added twice
    for name, tensor in merged_state_dict(model).items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6, msg=name)


def test_untied_gemma_head_is_refused(tmp_path):
    from tests.export.tokenizers_local import sentencepiece

    tokenizer = sentencepiece("gemma")
    model = tiny_model("gemma", vocab_size=len(tokenizer), tie_word_embeddings=False)
    with pytest.raises(UnsupportedModelError, match="tie_word_embeddings=False"):
        save_pretrained_gguf(model, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()
