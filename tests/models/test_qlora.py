"""QLoRA: a bitsandbytes NF4 model (double quantisation) patched by fastft vs the same model through PEFT.

bitsandbytes serves 4-bit on CPU, so this runs here: its CPU matmul dequantises the weight and multiplies
in the compute dtype (fp32 here), which is what fastft's fused LoRA Functions do with the NF4 kernel's
dequantised weight; the test of the kernel itself (tests/kernels/test_nf4.py) shows the dequantised weight
is bit-identical to bitsandbytes'. So losses and LoRA gradients agree to fp32 reordering, 1e-5 relative.
"""

from __future__ import annotations

import peft
import pytest
import torch
import transformers

from fastft.kernels import nf4
from fastft.models.patch import patch
from tests.models.tiny import batch, lora_config, tiny_model

pytest.importorskip("bitsandbytes")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _load_4bit(path) -> torch.nn.Module:
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization, dtype=torch.float32
    )


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_qlora_matches_bitsandbytes_peft(family, tmp_path, monkeypatch):
    # intermediate 128: bitsandbytes quantises in blocks of 64, so every projection has whole blocks
    tiny_model(family, intermediate_size=128).save_pretrained(tmp_path)
    torch.manual_seed(1)
    plain = peft.get_peft_model(_load_4bit(tmp_path), lora_config(family))
    fast = peft.get_peft_model(_load_4bit(tmp_path), lora_config(family))
    adapters = {n: p for n, p in plain.state_dict().items() if "lora_" in n}
    assert not fast.load_state_dict(adapters, strict=False).unexpected_keys
    patch(fast)
    plain.train(), fast.train()  # from_pretrained returns eval mode; trainers switch to train

    calls = {"dequantize": 0}
    original = nf4.NF4Weight.dequantize

    def counting(self):
        calls["dequantize"] += 1
        return original(self)

    monkeypatch.setattr(nf4.NF4Weight, "dequantize", counting)
    inputs = batch()
    ref, out = plain(**inputs), fast(**inputs)
    forward_calls = calls["dequantize"]
    ref.loss.backward()
    out.loss.backward()
    # 7 projections (Phi-3: 4) per layer, 2 layers, dequantised once in forward and once again in backward —
    # except layer 0's q/k/v (Phi-3: qkv), whose input comes from the frozen embedding: it needs no gradient,
    # so its base weight is not needed in backward at all.
    per_pass = (4 if family == "phi3" else 7) * 2
    skipped = 1 if family == "phi3" else 3
    assert forward_calls == per_pass and calls["dequantize"] - forward_calls == per_pass - skipped
    assert out.logits is None and _rel(out.loss, ref.loss) < 1e-5
    grads = {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}
    for name, param in plain.named_parameters():
        if param.requires_grad:
            assert _rel(grads[name], param.grad) < 1e-5, name


def test_qlora_bf16_no_worse_than_bitsandbytes_bf16(tmp_path):
    """bf16 compute: fastft's error against a float64 model holding the same dequantised weights is at most
    twice plain bitsandbytes + PEFT's error (norm-wise, loss and every LoRA gradient)."""
    import bitsandbytes.functional as bnbf

    tiny_model("llama", intermediate_size=128).save_pretrained(tmp_path)

    def load_bf16():
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=quantization, dtype=torch.bfloat16
        )
        return peft.get_peft_model(model, lora_config("llama"))

    torch.manual_seed(1)
    plain, fast = load_bf16(), load_bf16()
    adapters = {n: p for n, p in plain.state_dict().items() if "lora_" in n}
    fast.load_state_dict(adapters, strict=False)
    # The float64 oracle: the same architecture holding bitsandbytes' dequantised weights and the same adapters.
    exact = peft.get_peft_model(tiny_model("llama", intermediate_size=128).double(), lora_config("llama"))
    state = {}
    for name, module in plain.named_modules():
        weight = getattr(module, "weight", None)
        if name.endswith("base_layer") and getattr(weight, "quant_state", None) is not None:
            state[f"{name}.weight"] = bnbf.dequantize_4bit(weight.data, weight.quant_state).double()
    state.update({n: p.double() for n, p in plain.state_dict().items() if "lora_" in n or "norm" in n})
    state.update({n: p.double() for n, p in plain.state_dict().items() if "embed" in n or "lm_head" in n})
    missing = exact.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys and not [k for k in missing.missing_keys if "rotary" not in k]
    patch(fast)
    # In bf16 a one-ulp change of one activation moves a LoRA gradient of this tiny model by percents (attention
    # softmax), so two equally accurate computations scatter per tensor and per batch between ~0.3x and ~3x of
    # each other's error (measured: fastft/plain median 1.6 on one batch, 0.6-0.7 on three others). The check is
    # therefore on the root-sum-square error over every LoRA gradient and four batches, where that scatter
    # averages out: fastft may not be further from float64 than plain bitsandbytes + PEFT (1.25x margin).
    errors = {"plain": [0.0, 0.0], "fast": [0.0, 0.0]}  # [loss, gradients], squared and summed
    for seed in range(5, 9):
        inputs = batch(seed=seed)
        inputs.pop("attention_mask")  # float64 eager attention turns fully masked rows into NaN (see test_patch)
        results = {}
        for name, model in (("plain", plain), ("fast", fast), ("exact", exact)):
            model.train()
            model.zero_grad()
            loss = model(**inputs).loss
            loss.backward()
            grads = {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}
            results[name] = (loss.detach().double(), grads)
        exact_loss, exact_grads = results["exact"]
        for name in ("plain", "fast"):
            loss, grads = results[name]
            errors[name][0] += (loss - exact_loss).item() ** 2
            errors[name][1] += sum(((grads[n] - g).norm() ** 2 / g.norm() ** 2).item() for n, g in exact_grads.items())
    assert errors["fast"][0] ** 0.5 <= 1.25 * errors["plain"][0] ** 0.5, errors
    assert errors["fast"][1] ** 0.5 <= 1.25 * errors["plain"][1] ** 0.5, errors
