"""fastft.patch on image-text-to-text models: the language model, the vision tower and the loss on multimodal
sequences equal plain transformers + PEFT, with LoRA on the attention and MLP projections of both.

Every tiny model of :mod:`fastft.models.tiny_vision_configs` runs twice on the same images and text (fp32, training
mode, labels -100 on padding, prompt and image tokens): patched, then plain, each with the same LoRA adapters
(B non-zero, so every adapter matrix gets a gradient).
"""

import copy
import importlib

import peft
import pytest
import torch
from torch import nn

from fastft import patch
from fastft.kernels._dispatch import force_backend
from fastft.models.tiny_vision_configs import VISION_TYPES, tiny_vision_model

# Both runs compute the same fp32 formulas; fastft's kernels order the sums differently (fused q/k/v, the chunked
# loss, fp32 RoPE rounded once), so results agree to fp32 rounding accumulated over a few layers:
# measured (torch path): loss within 9e-8 relative, LoRA gradients within 1.7e-5 of their largest entry (Gemma 4,
# whose sqrt(hidden) scalings amplify rounding; 4e-6 or less elsewhere but LFM2-VL and Idefics3, 1e-5).
LOSS_RTOL = 1e-5  # on the mean cross-entropy
GRAD_TOL = 2e-4  # each LoRA gradient, as a fraction of that gradient's largest entry

_PROJECTIONS = {
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv", "proj", "out_proj",
    "gate_proj", "up_proj", "down_proj", "fc1", "fc2", "linear_fc1", "linear_fc2",
}  # fmt: skip
_VISION = ("visual", "vision")


def _lora_targets(model: nn.Module) -> list[str]:
    """Full names of the attention and MLP projections (plain nn.Linear; Gemma 4's clippable wrappers' inner
    linear) of the language model's and the vision tower's layers."""
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        leaf = parts[-1] if parts[-1] != "linear" else parts[-2]
        if type(module) is nn.Linear and leaf in _PROJECTIONS and ("layers" in parts or "blocks" in parts):
            names.append(name)
    return names


def _lora(model: nn.Module) -> nn.Module:
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=_lora_targets(model),
                             init_lora_weights=False)  # fmt: skip
    torch.manual_seed(1)
    return peft.get_peft_model(model, config)


def _lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}


def _run(model_type: str) -> tuple:
    """(report, patched loss, plain loss, patched LoRA grads, plain LoRA grads)."""
    base, inputs = tiny_vision_model(model_type)
    plain = _lora(copy.deepcopy(base))
    fast = _lora(patch(base))
    results = []
    for model in (fast, plain):
        model.train()
        loss = model(**inputs).loss
        loss.backward()
        results.append((loss.detach(), _lora_grads(model)))
    return base.fastft_report, results[0][0], results[1][0], results[0][1], results[1][1]


@pytest.fixture(scope="module")
def runs():
    """Every type on fastft's torch path (the kernels' twins, each held equal to its Triton kernel by the kernel
    tests): the model-level wiring is under test here; one type runs the interpreted Triton kernels below."""
    with force_backend("torch"):
        return {model_type: _run(model_type) for model_type in VISION_TYPES}


def _check_equal(model_type, run) -> None:
    _, fast_loss, plain_loss, fast_grads, plain_grads = run
    torch.testing.assert_close(fast_loss, plain_loss, rtol=LOSS_RTOL, atol=0)
    assert fast_grads.keys() == plain_grads.keys()
    vision = [n for n in fast_grads if any(v in n for v in _VISION)]
    assert vision and len(vision) < len(fast_grads), f"{model_type}: LoRA on both towers"
    for name, grad in fast_grads.items():
        want = plain_grads[name]
        if want is None:  # a layer the model never runs (LLaVA reads its tower's second-to-last layer)
            assert grad is None, name
            continue
        assert grad is not None, name
        scale = want.abs().max().item()
        error = (grad - want).abs().max().item()
        assert error <= GRAD_TOL * scale + 1e-12, f"{model_type} {name}: {error:.2e} vs largest {scale:.2e}"


@pytest.mark.parametrize("model_type", VISION_TYPES)
def test_patched_equals_plain_peft(runs, model_type):
    _check_equal(model_type, runs[model_type])


def test_patched_equals_plain_peft_on_the_triton_kernels():
    """Qwen2-VL through the interpreted Triton kernels: the vision tower's fused qkv LoRA, tokens-first RoPE,
    quick-GELU MLP and LayerNorm, the language model's M-RoPE attention and the fused loss on image sequences."""
    _check_equal("qwen2_vl", _run("qwen2_vl"))


@pytest.mark.parametrize("model_type", VISION_TYPES)
def test_report_names_the_vision_tower(runs, model_type):
    report = runs[model_type][0]
    assert report.fused_loss
    assert report.attentions and report.mlps
    vision = report.vision
    assert vision is not None and vision.attentions >= 2 and vision.mlps >= 2 and vision.norms >= 4, report.summary()
    assert "vision tower:" in report.summary()
    # what stays on transformers' code is named: at least the patch embedding (a conv or a linear over patches)
    assert vision.skipped and any("patch embedding" in reason for reason in vision.skipped.values()), vision.skipped
    if model_type.startswith("qwen"):
        assert report.tables == 1 and vision.tables == 1  # the M-RoPE tables and the vision tower's 2-D tables


@pytest.mark.parametrize("model_type", ["qwen2_vl", "llava", "mllama"])
def test_loss_on_image_sequences_never_builds_logits(model_type, monkeypatch):
    """Training with labels: no (batch, seq, vocab) logits; the head computes only the answer tokens' rows (the
    image tokens, padding and prompt are -100 and never reach it)."""
    flce = importlib.import_module("fastft.kernels.fused_linear_cross_entropy")  # the module, not the function
    model, inputs = tiny_vision_model(model_type)
    patch(model).train()
    rows, real = [], flce._cross_entropy_rows

    def counting(logits, *args, **kwargs):
        rows.append(tuple(logits.shape))
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(flce, "_cross_entropy_rows", counting)
    with force_backend("torch"):
        out = model(**inputs)
    assert out.logits is None
    answer = int((inputs["labels"] != -100).sum())  # shifting by one keeps every answer token's label
    assert sum(r for r, _ in rows) == answer < inputs["input_ids"].numel()


def test_patch_twice_changes_nothing_and_tags_the_head():
    """Idempotent on a composite model (the vision walk included), and the language model's head weight is tagged
    for TRL's log-prob call (the log-prob head then serves image sequences too)."""
    model, _ = tiny_vision_model("qwen2_5_vl")
    first = patch(model).fastft_report.summary()
    assert patch(model).fastft_report.summary() == first
    assert getattr(model.get_output_embeddings().weight, "_fastft_head", False)
