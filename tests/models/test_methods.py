"""The Unsloth-named surface on what ``FastModel`` returns: ``FastLanguageModel``, ``is_bfloat16_supported`` and the
model methods ``save_pretrained_merged``, ``push_to_hub_merged``, ``save_pretrained_gguf``, ``push_to_hub_gguf``,
``save_lora`` and ``load_lora``.

Uploads: ``huggingface_hub.HfApi.create_repo`` and ``HfApi.upload_folder`` (the two calls that reach the Hub) are
replaced by recorders that read the folder being uploaded; everything before them runs for real. The hub is offline
in tests (``HF_HUB_OFFLINE=1``), and the one test that leaves them in place checks that the error is
huggingface_hub's own. The GGUF methods are checked to forward their arguments to :mod:`fastft.export` (the export
itself is tested in ``tests/export``).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import huggingface_hub
import peft
import pytest
import torch
from safetensors.torch import load_file

import fastft
from fastft import FastLanguageModel, FastModel
from fastft.models import methods
from tests.helpers import backend

NAMES = ("save_pretrained_merged", "push_to_hub_merged", "save_pretrained_gguf", "push_to_hub_gguf", "save_lora")


@pytest.fixture(autouse=True)
def _torch_kernels():
    with backend("torch"):  # the API around the kernels is under test here, not the kernels (tests/kernels)
        yield


def _load(folder):
    return FastLanguageModel.from_pretrained(str(folder), max_seq_length=64, device_map="cpu")


def _randomise_adapters(model, seed: int = 11) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _adapters(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}


@pytest.fixture
def hub(monkeypatch):
    """Record create_repo / upload_folder calls (and the files being uploaded) instead of reaching the Hub."""
    calls: dict[str, object] = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs, self.token)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*")}
        calls["upload_folder"] = (repo_id, kwargs, {k: v for k, v in files.items() if v or k.endswith(".json")})
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_unsloth_names():
    assert FastLanguageModel is FastModel and fastft.FastLanguageModel is FastModel
    assert {"FastLanguageModel", "is_bfloat16_supported", "to_sharegpt"} <= set(fastft.__all__)
    from fastft import (  # as Unsloth's Ollama notebook does
        apply_chat_template,
        chat_templates,
        standardize_sharegpt,
        to_sharegpt,
    )

    assert (apply_chat_template, standardize_sharegpt, to_sharegpt) == (
        chat_templates.apply_chat_template,
        chat_templates.standardize_sharegpt,
        chat_templates.to_sharegpt,
    )
    if not torch.cuda.is_available():
        assert fastft.is_bfloat16_supported() is False  # so notebooks' bf16=is_bfloat16_supported() stays off


def test_is_bfloat16_supported_follows_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native, expected in ((True, True), (False, False)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n)
        assert fastft.is_bfloat16_supported() is expected


def test_methods_on_loaded_and_peft_models(tiny_checkpoint):
    model, _ = _load(tiny_checkpoint())
    assert all(callable(getattr(model, name)) for name in NAMES)
    peft_model = FastLanguageModel.get_peft_model(model, r=4)
    assert all(getattr(peft_model, name).__self__ is peft_model for name in (*NAMES, "load_lora"))
    with pytest.raises(TypeError, match="needs a model with LoRA adapters"):
        model.save_lora("unused")  # the bare model it was made from has no adapters of its own


def test_push_to_hub_merged_uploads_the_merged_checkpoint(tiny_checkpoint, tmp_path, hub):
    model, tokenizer = _load(tiny_checkpoint())
    model = FastLanguageModel.get_peft_model(model, r=4)
    _randomise_adapters(model)
    model.save_pretrained_merged(tmp_path / "local", tokenizer, save_method="merged_16bit")
    assert model.push_to_hub_merged("me/tiny", tokenizer, save_method="merged_16bit", token="") == "commit-info"
    repo_id, create_kwargs, token = hub["create_repo"]
    assert repo_id == "me/tiny" and create_kwargs["exist_ok"] is True and token is None  # "" means the saved login
    repo_id, upload_kwargs, files = hub["upload_folder"]
    assert repo_id == "me/tiny" and upload_kwargs["commit_message"] == methods.DEFAULT_COMMIT_MESSAGE
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files.keys()
    local = load_file(tmp_path / "local" / "model.safetensors")
    (tmp_path / "uploaded.safetensors").write_bytes(files["model.safetensors"])
    pushed = load_file(tmp_path / "uploaded.safetensors")
    assert local.keys() == pushed.keys() and all(torch.equal(local[k], pushed[k]) for k in local)
    assert not any("lora_" in k for k in pushed)

    model.push_to_hub_merged("me/tiny-lora", tokenizer, save_method="lora", token="hf_x", private=True)
    _, create_kwargs, token = hub["create_repo"]
    assert token == "hf_x" and create_kwargs["private"] is True
    assert "adapter_model.safetensors" in hub["upload_folder"][2]
    with pytest.raises(ValueError, match="not a Hub repository name"):
        model.push_to_hub_merged("a/b/c", tokenizer)
    with pytest.raises(ValueError, match="save_method"):
        model.push_to_hub_merged("me/tiny", tokenizer, save_method="merged_8bit")


def test_push_without_network_fails_with_huggingface_hubs_error(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model, tokenizer = _load(tiny_checkpoint())
    with pytest.raises(Exception) as raised:
        model.push_to_hub_merged("me/tiny", tokenizer, token="hf_x")
    assert type(raised.value).__module__.startswith(("huggingface_hub", "requests", "httpx")), raised.value


def test_gguf_methods_forward_to_fastft_export(tiny_checkpoint, monkeypatch):
    calls = []
    fake = types.ModuleType("fastft.export")
    fake.save_pretrained_gguf = lambda *args, **kwargs: calls.append(("save", args, kwargs)) or ["a.gguf"]
    fake.push_to_hub_gguf = lambda *args, **kwargs: calls.append(("push", args, kwargs)) or ["a.gguf"]
    monkeypatch.setitem(sys.modules, "fastft.export", fake)
    model, tokenizer = _load(tiny_checkpoint())
    model = FastLanguageModel.get_peft_model(model, r=4)
    assert model.save_pretrained_gguf("out", tokenizer) == ["a.gguf"]
    model.save_pretrained_gguf("out", tokenizer, quantization_method=["q4_k_m", "q8_0"], overwrite=True)
    model.push_to_hub_gguf("me/tiny", tokenizer, quantization_method="f16", token="")
    model.push_to_hub_gguf("me/tiny", tokenizer, token="hf_x", private=True)
    assert calls == [
        ("save", (model, tokenizer, "out"), {"quantization_method": "q8_0"}),
        ("save", (model, tokenizer, "out"), {"quantization_method": ["q4_k_m", "q8_0"], "overwrite": True}),
        ("push", (model, tokenizer, "me/tiny"), {"quantization_method": "f16", "token": None}),
        ("push", (model, tokenizer, "me/tiny"), {"quantization_method": "q8_0", "token": "hf_x", "private": True}),
    ]


def test_save_lora_load_lora_round_trip(tiny_checkpoint, tmp_path):
    model, _ = _load(tiny_checkpoint())
    model = FastLanguageModel.get_peft_model(model, r=4)
    _randomise_adapters(model, seed=1)
    saved = _adapters(model)
    model.save_lora(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists()
    _randomise_adapters(model, seed=2)
    assert not all(torch.equal(saved[k], v) for k, v in _adapters(model).items())
    assert model.load_lora(tmp_path / "lora") is model
    assert all(torch.equal(saved[k], v) for k, v in _adapters(model).items())

    model.load_lora(tmp_path / "lora", adapter_name="second")  # as a new adapter next to "default"
    assert "second" in model.peft_config
    other, _ = _load(tiny_checkpoint())
    other = FastLanguageModel.get_peft_model(other, r=8)
    with pytest.raises(ValueError, match="r: saved 4, live 8"):
        other.load_lora(tmp_path / "lora")


def test_from_pretrained_on_saved_adapters_reloads_them(tiny_checkpoint, tmp_path):
    """Unsloth's reload cell, ``FastLanguageModel.from_pretrained(model_name="lora_model")``: base + adapters."""
    model, tokenizer = _load(tiny_checkpoint())
    model = FastLanguageModel.get_peft_model(model, r=4)
    _randomise_adapters(model)
    model.save_pretrained(tmp_path / "lora_model")  # the notebook's own spelling
    tokenizer.save_pretrained(tmp_path / "lora_model")
    reloaded, reloaded_tokenizer = _load(tmp_path / "lora_model")
    assert isinstance(reloaded, peft.PeftModel) and callable(reloaded.save_lora)
    assert _adapters(reloaded).keys() == _adapters(model).keys()
    assert all(torch.equal(v, _adapters(model)[k]) for k, v in _adapters(reloaded).items())
    assert any(p.requires_grad for n, p in reloaded.named_parameters() if "lora_" in n)  # trainable, as saved
    assert reloaded_tokenizer.model_max_length == 64 and reloaded_tokenizer.pad_token is not None
    prompt = torch.tensor([[1, 3, 4, 5, 6]])
    FastLanguageModel.for_inference(model)
    FastLanguageModel.for_inference(reloaded)
    with torch.no_grad():
        assert torch.equal(model(input_ids=prompt).logits, reloaded(input_ids=prompt).logits)


def test_gguf_methods_write_and_upload_real_files(tmp_path, hub):
    """The methods on fastft.export itself: the embedded Llama (byte-level BPE tokenizer) with adapters, written as
    an f16 GGUF and pushed as q8_0 up to the upload call (the files themselves are checked in tests/export)."""
    from fastft.bench.assets import default_model, default_tokenizer

    default_model(seed=0).save_pretrained(tmp_path / "base")
    default_tokenizer().save_pretrained(tmp_path / "base")
    model, tokenizer = _load(tmp_path / "base")
    model = FastLanguageModel.get_peft_model(model, r=4)
    _randomise_adapters(model)
    paths = model.save_pretrained_gguf(tmp_path / "gguf", tokenizer, quantization_method="f16")
    names = sorted(Path(p).name for p in paths)
    assert names == ["Modelfile", "gguf.F16.gguf"] and all(Path(p).stat().st_size for p in paths)
    model.push_to_hub_gguf("me/tiny-gguf", tokenizer, token="")
    repo_id, upload_kwargs, files = hub["upload_folder"]
    assert repo_id == "me/tiny-gguf" and hub["create_repo"][2] is None and "commit_message" in upload_kwargs
    assert sorted(files) == ["Modelfile", "tiny-gguf.Q8_0.gguf"]
    assert files["tiny-gguf.Q8_0.gguf"][:4] == b"GGUF"
