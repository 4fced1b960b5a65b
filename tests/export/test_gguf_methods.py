"""Each quantisation written in Python holds the merged weights to its own precision; a QLoRA model (NF4 base)
exports its dequantised base plus the adapter; ``push_to_hub_gguf`` uploads what ``save_pretrained_gguf`` wrote.

The bound for a method is the rounding of its format, relative to the largest magnitude of a row (the 32-value
blocks share one scale, so no element's error exceeds half a step of its block's scale, and a block's scale is
at most the row's): q8_0 1/127 (plus the f16 scale's 2^-11), q5_0/q5_1 1/16 of half-range steps, q4_0/q4_1 1/8,
bf16 2^-8, f16 2^-11 relative to the element.
"""

from __future__ import annotations

import os

import numpy as np
import peft
import pytest
import torch

from fastft.export import push_to_hub_gguf, save_pretrained_gguf
from fastft.export.merge import merged_state_dict
from tests.export.client import hf_logits, llama_logits, load
from tests.export.tokenizers_local import byte_level
from tests.models.tiny import TEXT_VOCAB, lora_config, tiny_model

STEP = {"q8_0": 1 / 127, "q5_0": 1 / 16, "q5_1": 1 / 16, "q4_0": 1 / 8, "q4_1": 1 / 8}


def _model():
    base = tiny_model("llama", **TEXT_VOCAB, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    return peft.get_peft_model(base, lora_config("llama"))


def test_python_quantisations_hold_the_merged_weights(tmp_path):
    import transformers

    model, tokenizer = _model(), byte_level()
    methods = ["bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1"]
    paths = save_pretrained_gguf(model, tokenizer, tmp_path, methods, progress=False)
    merged = merged_state_dict(model)
    ids = tokenizer("Rewrite this sentence in the past tense: I walk to school.")["input_ids"]
    for method, path in zip(methods, paths):
        llm = load(path)  # llama.cpp reads every tensor type it was given
        assert np.isfinite(llama_logits(llm, ids)).all()
        llm.close()
        if method == "bf16":
            continue  # transformers' GGUF loader does not dequantise BF16; llama.cpp's logits are checked below
        back = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file=os.path.basename(path)
        ).state_dict()
        for name, tensor in merged.items():
            if (
                tensor.dim() != 2
                or "embed" in name
                or "lm_head" in name
                or "self_attn.q_proj" in name
                or ("self_attn.k_proj" in name)
            ):
                continue  # q/k rows are permuted back by the loader after dequantisation; compared via logits below
            bound = (STEP[method] + 2**-11) * tensor.abs().amax(dim=1, keepdim=True)
            assert ((back[name] - tensor).abs() <= bound).all(), f"{method}: {name}"
    llm = load(paths[0])
    ref = hf_logits(model, ids)
    err = np.abs(llama_logits(llm, ids) - ref).max()
    assert err <= 2e-2 * np.abs(ref).max(), f"bf16 logits differ by {err:.3e}"
    llm.close()


def test_qlora_base_is_dequantised_and_merged(tmp_path):
    pytest.importorskip("bitsandbytes")
    import transformers

    # intermediate 128: bitsandbytes' CPU dequantize_4bit (the reference below) is wrong for rows of 96 values
    sizes = {"intermediate_size": 128, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
    base = tiny_model("llama", **TEXT_VOCAB, **sizes)
    base.save_pretrained(tmp_path / "base")
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    qmodel = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=quantization, dtype=torch.float32
    )
    model = peft.get_peft_model(qmodel, lora_config("llama"))
    tokenizer = byte_level()
    paths = save_pretrained_gguf(model, tokenizer, tmp_path / "out", "f32", progress=False)
    ids = tokenizer("What is 17 + 25? Answer: 42.")["input_ids"]
    # the reference: bitsandbytes' own dequantisation of each NF4 weight plus PEFT's delta, in a plain fp32 model
    # (Linear4bit's own CPU forward in this bitsandbytes build is not x @ dequantize_4bit(W).T: not the reference)
    import bitsandbytes

    reference = tiny_model("llama", **TEXT_VOCAB, **sizes)
    with torch.no_grad():
        for name, module in model.base_model.model.named_modules():
            if hasattr(module, "lora_A"):
                weight = module.base_layer.weight
                dense = bitsandbytes.functional.dequantize_4bit(weight.data, weight.quant_state).float()
                reference.get_submodule(name).weight.copy_(dense + module.get_delta_weight("default"))
    ref = hf_logits(reference, ids)
    llm = load(paths[0])
    err = np.abs(llama_logits(llm, ids) - ref).max()
    llm.close()
    assert err <= 2e-5 * np.abs(ref).max(), f"logits differ by {err:.3e}"


def test_push_to_hub_uploads_the_export(monkeypatch):
    import huggingface_hub

    calls = []

    class Recorder:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs.get("private")))

        def upload_folder(self, repo_id, folder_path, commit_message, **kwargs):
            calls.append(("upload", repo_id, sorted(os.listdir(folder_path)), commit_message))

    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    names = push_to_hub_gguf(_model(), byte_level(), "me/tiny-GGUF", "q8_0", token="hf_x", private=True, progress=False)
    assert names == ["tiny-GGUF.Q8_0.gguf", "Modelfile"]
    assert calls == [
        ("token", "hf_x"),
        ("create_repo", "me/tiny-GGUF", True),
        ("upload", "me/tiny-GGUF", ["Modelfile", "tiny-GGUF.Q8_0.gguf"], "Upload GGUF export (fastft)"),
    ]


def test_llama_cpp_quantisation_alone_leaves_only_its_file(tmp_path):
    pytest.importorskip("llama_cpp")
    model, tokenizer = _model(), byte_level()
    paths = save_pretrained_gguf(model, tokenizer, tmp_path / "out", ["q4_k_m", "q6_k"], progress=False)
    # the f16 input of llama.cpp's quantiser was written to a scratch folder and removed
    assert sorted(os.listdir(tmp_path / "out")) == ["Modelfile", "out.Q4_K_M.gguf", "out.Q6_K.gguf"]
    ids = tokenizer("What is 17 + 25? Answer: 42.")["input_ids"]
    ref = hf_logits(model, ids)
    for path, file_type, least in zip(paths[:2], ("MOSTLY_Q4_K_M", "MOSTLY_Q6_K"), (0.95, 0.99)):
        import gguf

        assert gguf.GGUFReader(path).fields["general.file_type"].contents() == gguf.LlamaFileType[file_type]
        llm = load(path)
        got = llama_logits(llm, ids)
        llm.close()
        # tiny rows (64 values) are below the k-quants' 256-value blocks, so llama.cpp falls back to 4/5/8-bit block
        # types, and random weights give flat logits: the check is their correlation with transformers' (measured
        # q4_k_m 0.984, q6_k 0.999)
        correlation = np.corrcoef(got.ravel(), ref.ravel())[0, 1]
        print(f"{file_type}: correlation {correlation:.4f}")
        assert correlation >= least, (file_type, correlation)


def test_patched_model_exports_the_same_file(tmp_path):
    """fastft's patching swaps forwards, never weights: the export of a patched model is byte-identical."""
    import copy

    from fastft.models.patch import patch

    plain = _model()
    patched = patch(copy.deepcopy(plain))
    first = save_pretrained_gguf(plain, byte_level(), tmp_path / "a", "f16", model_name="m", progress=False)[0]
    second = save_pretrained_gguf(patched, byte_level(), tmp_path / "b", "f16", model_name="m", progress=False)[0]
    with open(first, "rb") as a, open(second, "rb") as b:
        assert a.read() == b.read()
