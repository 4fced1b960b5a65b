"""``FastModel``: loading, LoRA set-up, modes and saving, checked against plain transformers + PEFT.

Tolerances: fp32 throughout. A fastft forward computes the same formulas as transformers with fused kernels
(another summation order), so logits agree to ~1e-5 relative, norm-wise (measured ~1e-6). Saved and merged
weights are compared exactly, or to 1e-6 absolute where both sides compute ``W + scaling * B @ A`` in fp32.
"""

from __future__ import annotations

import logging
import sys

import bitsandbytes
import bitsandbytes.functional as bnbf
import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from fastft import FastModel
from fastft.models.checkpointing import offloaded_checkpoint
from fastft.models.fast_model import LLAMA_TARGETS
from tests.helpers import backend
from tests.models.tiny import tiny_model

PROMPT = torch.tensor([[1, 3, 4, 5, 6, 7, 8]])
# Quantised checkpoints use an MLP width that is a multiple of 64, as real models have: on CPUs with AVX512-BF16,
# bitsandbytes repacks 4-bit weights in blocks of 64 input features and fails on tiny.py's 96.
QUANT = {"intermediate_size": 128}


@pytest.fixture(autouse=True)
def _torch_kernels():
    """Run fastft's kernels on their torch path (same hand-written backward as the Triton one): this file tests
    the API around them, the kernels themselves (both paths) are tested in tests/kernels and test_patch.py, and
    Triton's interpreter would make every forward here take seconds."""
    with backend("torch"):
        yield


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative difference ``||a - b|| / ||b||``."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _load(folder, **kwargs):
    """``FastModel.from_pretrained`` on the CPU (also where a GPU is present: the tests use CPU tensors)."""
    return FastModel.from_pretrained(str(folder), **{"device_map": "cpu", "max_seq_length": 64, **kwargs})


def _randomise_adapters(model: torch.nn.Module) -> None:
    """Give every adapter weight a non-zero value (B starts at zero), so a merge has something to merge."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """LoRA layers by the name their weight has in a plain checkpoint (``model.layers.0.self_attn.q_proj``)."""
    root = model.get_base_model()
    return {name: m for name, m in root.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROMPT).logits


# ------------------------------------------------------------------------------------------------ from_pretrained


def test_from_pretrained_local_folder(tiny_checkpoint):
    folder = tiny_checkpoint()
    model, tokenizer = _load(folder, max_seq_length=64)
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.dtype == torch.float32  # dtype=None on the CPU
    assert model.fastft_report.norms > 0 and model.fastft_report.mlps == 2  # patched
    assert model.max_seq_length == 64 and tokenizer.model_max_length == 64
    assert tokenizer.pad_token == "<unk>"  # no pad-named token in the vocabulary; unk is not eos
    assert _rel(_logits(model.eval()), _logits(plain)) < 1e-5


def test_pad_token_falls_back_to_eos_with_a_warning(tiny_checkpoint, caplog):
    with caplog.at_level(logging.WARNING, logger="fastft"):
        _, tokenizer = _load(tiny_checkpoint(unk=False))
    assert tokenizer.pad_token == "</s>"
    assert "also masks eos" in caplog.text


def test_pickle_checkpoint_refused_unless_allowed(tiny_checkpoint):
    folder = tiny_checkpoint(pickle=True)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*allow_pickle=True"):
        _load(folder)
    model, _ = _load(folder, allow_pickle=True)
    expected = tiny_model("llama").state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_load_in_4bit_on_cpu_is_nf4_double_quant(tiny_checkpoint):
    model, _ = _load(tiny_checkpoint(**QUANT), load_in_4bit=True)
    quant = model.config.quantization_config
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.float32
    proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(proj, bitsandbytes.nn.Linear4bit) and type(proj.weight).__name__ == "Params4bit"
    assert model.lm_head.weight.dtype == torch.float32  # the head is not quantised


def test_quantisation_errors(tiny_checkpoint, monkeypatch):
    folder = str(tiny_checkpoint())
    with pytest.raises(ValueError, match="load_in_4bit=True and load_in_8bit=True"):
        _load(folder, load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="full_finetuning=True"):
        _load(folder, load_in_8bit=True, full_finetuning=True)
    with pytest.raises(ValueError, match="max_seq_length must be a positive int"):
        _load(folder, max_seq_length=0)
    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"})
    with pytest.raises(ValueError, match=r"cannot run on \['cpu'\]"):
        _load(folder, load_in_4bit=True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        _load(folder, load_in_4bit=True)


def test_max_seq_length(tiny_checkpoint):
    with pytest.warns(UserWarning, match="max_position_embeddings=256"):
        _load(tiny_checkpoint(), max_seq_length=512)
    model, _ = _load(tiny_checkpoint(), max_seq_length=8)
    peft_model = FastModel.get_peft_model(model, r=4)
    ids = torch.randint(3, 15, (2, 9))
    FastModel.for_training(peft_model)
    assert peft_model.training and not model.config.use_cache
    with pytest.raises(ValueError, match=r"9 tokens is longer than max_seq_length=8"):
        peft_model(input_ids=ids, labels=ids)
    assert peft_model(input_ids=ids[:, :8], labels=ids[:, :8]).loss.isfinite()
    FastModel.for_inference(peft_model)
    assert not peft_model.training and model.config.use_cache
    assert peft_model(input_ids=ids).logits.shape == (2, 9, 128)  # eval forwards are not limited
    out = peft_model.generate(PROMPT, max_new_tokens=6, do_sample=False)  # 7 + 6 tokens > 8
    assert out.shape == (1, 13)


# ------------------------------------------------------------------------------------------------ get_peft_model


def test_target_modules_are_validated(tiny_checkpoint):
    model, _ = _load(tiny_checkpoint())
    with pytest.raises(ValueError, match=r"\['nope'\] are not linear or embedding modules") as err:
        FastModel.get_peft_model(model, target_modules=["q_proj", "nope"])
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert repr(name) in str(err.value)
    with pytest.raises(TypeError, match="not LoraConfig fields"):
        FastModel.get_peft_model(model, lora_alpah=16)


def test_phi3_llama_names_map_onto_fused_projections(tiny_checkpoint):
    model, _ = _load(tiny_checkpoint("phi3"))
    peft_model = FastModel.get_peft_model(model, r=4)  # the default, Llama-style target list
    assert set(peft_model.peft_config["default"].target_modules) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    layers = _lora_layers(peft_model)
    assert "model.layers.0.self_attn.qkv_proj" in layers and "model.layers.1.mlp.gate_up_proj" in layers
    model, _ = _load(tiny_checkpoint("phi3"))
    with pytest.warns(UserWarning, match=r"'q_proj' maps onto this model's fused 'qkv_proj'.*'k_proj', 'v_proj'"):
        peft_model = FastModel.get_peft_model(model, r=4, target_modules=["q_proj"])
    assert set(peft_model.peft_config["default"].target_modules) == {"qkv_proj"}


@pytest.mark.parametrize("use_rslora, expected", [(False, 8 / 4), (True, 8 / 4**0.5)])
def test_lora_scaling(tiny_checkpoint, use_rslora, expected):
    model, _ = _load(tiny_checkpoint())
    peft_model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_rslora=use_rslora)
    layers = _lora_layers(peft_model)
    assert len(layers) == 7 * 2
    assert all(layer.scaling["default"] == pytest.approx(expected) for layer in layers.values())


@pytest.mark.parametrize(
    "mode, checkpointed, offloaded", [(False, False, False), (True, True, False), ("unsloth", True, True)]
)
def test_checkpointing_mode_is_applied(tiny_checkpoint, mode, checkpointed, offloaded):
    model, _ = _load(tiny_checkpoint())
    peft_model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=mode)
    for layer in model.model.layers:
        assert layer.gradient_checkpointing is checkpointed
        assert (layer._gradient_checkpointing_func is offloaded_checkpoint) is offloaded
    ids = torch.randint(3, 15, (2, 6))
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_" in n)


def test_random_state_seeds_adapters_and_leaves_the_global_rng(tiny_checkpoint):
    def lora_a(seed: int) -> torch.Tensor:
        model, _ = _load(tiny_checkpoint())
        peft_model = FastModel.get_peft_model(model, r=4, random_state=seed)
        return _lora_layers(peft_model)["model.layers.0.self_attn.q_proj"].lora_A["default"].weight

    state = torch.get_rng_state()
    first, again, other = lora_a(3407), lora_a(3407), lora_a(1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), state)


def test_fp16_modules_to_save_become_fp32(tiny_checkpoint):
    model, _ = _load(tiny_checkpoint(), dtype=torch.float16)
    peft_model = FastModel.get_peft_model(model, r=4, modules_to_save=["lm_head"])
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert len(trainable) == 7 * 2 * 2 + 1 and all(p.dtype == torch.float32 for p in trainable)
    assert model.model.embed_tokens.weight.dtype == torch.float16  # the frozen base is not upcast


def test_4bit_peft_model_trains_and_generates(tiny_checkpoint):
    model, _ = _load(tiny_checkpoint(**QUANT), load_in_4bit=True)
    peft_model = FastModel.for_training(FastModel.get_peft_model(model, r=4))
    ids = torch.randint(3, 15, (2, 6))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    out = FastModel.for_inference(peft_model).generate(PROMPT, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, PROMPT.shape[1] + 3)


# ------------------------------------------------------------------------------------------------ saving


def test_save_lora_loads_into_plain_peft(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint()
    model, tokenizer = _load(folder)
    peft_model = FastModel.get_peft_model(model, r=4)
    _randomise_adapters(peft_model)
    peft_model.save_pretrained_merged(tmp_path / "adapter", tokenizer, save_method="lora")  # Unsloth's spelling
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "adapter" / "tokenizer.json").exists()

    plain = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter").eval()
    ours = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    theirs = {k: v for k, v in plain.state_dict().items() if "lora_" in k}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    FastModel.for_inference(peft_model)
    assert _rel(_logits(peft_model), _logits(plain)) < 1e-5
    generated = peft_model.generate(PROMPT, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, plain.generate(PROMPT, max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize(
    "family, overrides, extra_targets",
    [
        ("llama", {}, ()),
        ("llama", {}, ("embed_tokens", "lm_head")),
        ("phi3", {}, ()),
        ("qwen2", {"tie_word_embeddings": True}, ()),
    ],
    ids=["llama", "llama-lora-on-embeddings-and-head", "phi3-fused-projections", "qwen2-tied-embeddings"],
)
def test_save_merged_16bit_is_a_plain_checkpoint_and_leaves_the_model(
    tiny_checkpoint, tmp_path, family, overrides, extra_targets
):
    model, tokenizer = _load(tiny_checkpoint(family, **overrides))
    peft_model = FastModel.get_peft_model(model, r=4, target_modules=[*LLAMA_TARGETS, *extra_targets])
    _randomise_adapters(peft_model)
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    FastModel.save_pretrained_merged(peft_model, tokenizer, tmp_path / "merged", save_method="merged_16bit")

    after = peft_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(layer.merged for layer in _lora_layers(peft_model).values())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert getattr(plain.config, "quantization_config", None) is None and plain.dtype == torch.float32
    assert _rel(_logits(peft_model.eval()), _logits(plain)) < 1e-5
    assert (tmp_path / "merged" / "tokenizer.json").exists()

    peft_model.train()  # the live model keeps training
    ids = torch.randint(3, 15, (2, 6))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("flag", ["load_in_4bit", "load_in_8bit"])
def test_merged_from_quantised_base_is_dequantised_base_plus_delta(tiny_checkpoint, tmp_path, flag):
    folder = tiny_checkpoint(**QUANT)
    model, tokenizer = _load(folder, **{flag: True})
    peft_model = FastModel.get_peft_model(model, r=4, lora_alpha=8)
    _randomise_adapters(peft_model)
    FastModel.save_pretrained_merged(peft_model, tokenizer, tmp_path, save_method="merged_16bit")
    saved = load_file(tmp_path / "model.safetensors")

    # The reference base: the same checkpoint quantised by plain transformers, dequantised by bitsandbytes.
    quant = BitsAndBytesConfig(
        **{flag: True}, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant)
    layers = _lora_layers(peft_model)
    for name, module in base.named_modules():
        if name in layers:
            w = module.weight
            dense = (
                bnbf.dequantize_4bit(w.data, w.quant_state)
                if flag == "load_in_4bit"
                else (bnbf.int8_vectorwise_dequant(w.data, w.SCB))
            )
            lora = layers[name]
            delta = lora.lora_B["default"].weight @ lora.lora_A["default"].weight * lora.scaling["default"]
            torch.testing.assert_close(saved[name + ".weight"], dense.float() + delta, atol=1e-6, rtol=0)
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(saved[key], base.state_dict()[key])


def test_merged_reads_a_weight_bitsandbytes_repacked_for_the_cpu(tiny_checkpoint, tmp_path):
    model, tokenizer = _load(tiny_checkpoint(**QUANT), load_in_4bit=True)
    peft_model = FastModel.get_peft_model(model, r=4)
    base = _lora_layers(peft_model)["model.layers.0.mlp.down_proj"].base_layer
    before = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state)
    with torch.no_grad():  # bitsandbytes' own eval forward repacks the weight in place on AVX512-BF16 CPUs
        base.eval()(torch.randn(1, base.in_features))
    FastModel.save_pretrained_merged(peft_model, tokenizer, tmp_path)  # B = 0: merged = the base weight
    saved = load_file(tmp_path / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    # Repacking rounds each block's absmax to bf16 (relative 2^-8): the weight bitsandbytes now computes with.
    torch.testing.assert_close(saved, before, rtol=2**-8, atol=0)


def test_save_merged_4bit_equals_quantising_the_merged_checkpoint(tiny_checkpoint, tmp_path):
    model, tokenizer = _load(tiny_checkpoint(**QUANT), load_in_4bit=True)
    peft_model = FastModel.get_peft_model(model, r=4)
    _randomise_adapters(peft_model)
    FastModel.save_pretrained_merged(peft_model, tokenizer, tmp_path / "16", save_method="merged_16bit")
    with pytest.warns(UserWarning, match="rounds W \\+ scaling \\* B @ A to NF4"):
        FastModel.save_pretrained_merged(peft_model, tokenizer, tmp_path / "4", save_method="merged_4bit")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "4")
    expected = AutoModelForCausalLM.from_pretrained(
        tmp_path / "16", quantization_config=model.config.quantization_config
    )
    assert reloaded.config.quantization_config.load_in_4bit
    for (name, ours), (_, theirs) in zip(reloaded.named_modules(), expected.named_modules()):
        if isinstance(ours, bitsandbytes.nn.Linear4bit):
            dense = bnbf.dequantize_4bit(ours.weight.data, ours.weight.quant_state)
            assert torch.equal(dense, bnbf.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)), name
    assert sum(isinstance(m, bitsandbytes.nn.Linear4bit) for m in reloaded.modules()) == 7 * 2


def test_save_errors(tiny_checkpoint, tmp_path):
    model, tokenizer = _load(tiny_checkpoint())
    with pytest.raises(ValueError, match="save_method='merged_8bit' is not one of"):
        FastModel.save_pretrained_merged(model, tokenizer, tmp_path, save_method="merged_8bit")
    with pytest.raises(ValueError, match="needs a model with adapters"):
        FastModel.save_pretrained_merged(model, tokenizer, tmp_path, save_method="lora")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="is not a directory fastft can write to"):
        FastModel.save_pretrained_merged(model, tokenizer, blocker / "out")
    FastModel.save_pretrained_merged(model, None, tmp_path / "plain")  # no adapters: a plain copy, no tokenizer
    assert torch.equal(load_file(tmp_path / "plain" / "model.safetensors")["lm_head.weight"], model.lm_head.weight)
