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
