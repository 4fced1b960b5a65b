"""``fastft.patch`` never breaks a model plain transformers runs, and decides the fused loss by structure.

Each test builds a tiny model of a type that used to crash or lose the fused loss (from
:func:`fastft.models.tiny_configs.tiny_config`), patches a copy and compares one training step with plain
transformers on the same weights and inputs. Tolerance 1e-5 relative (norm-wise) as in test_patch.py: fp32 with
fastft's reordered sums agrees to ~1e-6; a wrong scale, cap or gradient is off by far more.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

from fastft.kernels import force_backend, lora_linear, lora_mlp, lora_qkv
from fastft.kernels.lora import LoRAProjection
from fastft.models import layers, recognize
from fastft.models.patch import patch
from fastft.models.tiny_configs import tiny_config


@pytest.fixture(autouse=True)
def _torch_kernels():
    """The wiring is under test: the kernels' torch path (the Triton kernels equal it, tests/kernels)."""
    with force_backend("torch"):
        yield


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _build(model_type: str, **overrides) -> nn.Module:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type!r}")
    config = tiny_config(model_type)
    for name, value in overrides.items():
        setattr(config.get_text_config(), name, value)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).train()


def _inputs(vocab: int = 256) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, min(vocab, 200), (2, 12), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :3] = -100
    return {"input_ids": ids, "labels": labels}


def _same_step(plain: nn.Module, fast: nn.Module, **kwargs) -> None:
    inputs = {**_inputs(), **kwargs}
    ref, out = plain(**inputs), fast(**inputs)
    assert _rel(out.loss, ref.loss) < 1e-5
    ref.loss.backward()
    out.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        if p.grad is not None:
            assert _rel(q.grad, p.grad) < 1e-5, name


def _patched_twin(model_type: str, **overrides) -> tuple[nn.Module, nn.Module]:
    plain = _build(model_type, **overrides)
    fast = copy.deepcopy(plain)
    patch(fast)
    return plain, fast


# ------------------------------------------------------------------------------------------------ never a crash


def test_a_probe_that_raises_anything_leaves_the_block_and_says_why(monkeypatch):
    """Zamba2's probe raised KeyError out of patch(); now any exception keeps the block as it is."""

    def broken(*args, **kwargs):
        raise KeyError("layer_idx")

    monkeypatch.setattr(recognize, "probe_mlp", broken)
    monkeypatch.setattr("fastft.models.patch.probe_mlp", broken)
    plain, fast = _patched_twin("llama")
    report = fast.fastft_report
    assert report.mlps == 0 and "KeyError" in report.skipped["LlamaMLP"]
    assert not any(isinstance(m, layers.FastGatedMLP) for m in fast.modules())
    _same_step(plain, fast)


def test_gated_norms_are_not_taken_for_plain_ones():
    """Qwen3.5's RMSNormGated(x, gate) crashed when taken for a plain RMSNorm; the model must run as plain."""
    plain, fast = _patched_twin("qwen3_5_text")
    assert fast.fastft_report.attentions > 0 and fast.fastft_report.fused_loss
    gated = [m for m in fast.modules() if "gated" in type(m).__name__.lower() and "norm" in type(m).__name__.lower()]
    assert gated and not any(isinstance(m, layers.FastRMSNorm) for m in gated)
    _same_step(plain, fast)


def test_a_norm_called_with_an_argument_the_probe_did_not_see_runs_its_own_forward():
    class OptionalGateRMSNorm(nn.Module):
        def __init__(self, width: int):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(width) + 0.5)
            self.variance_epsilon = 1e-6

        def forward(self, hidden_states, scale=None):
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            out = self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))
            return out if scale is None else out * scale

    norm = OptionalGateRMSNorm(8)
    norm._fastft_eps_attr, norm._fastft_offset = "variance_epsilon", 0.0
    layers.swap_class(norm, layers.FastRMSNorm)
    x = torch.randn(3, 8)
    assert torch.allclose(norm(x, 2.0), 2 * norm(x), rtol=1e-6)


def test_composite_roots_patch_their_language_model_only():
    """Gemma 3 checkpoints of 4B and up are multimodal: their root config has no hidden_size. The language model is
    patched with the text config and counted in the report; the vision tower is walked apart (``report.vision``)."""
    plain, fast = _patched_twin("gemma3")
    report = fast.fastft_report
    assert report.norms and report.mlps and report.attentions and report.fused_loss
    language = fast.model.language_model
    assert report.attentions == sum(isinstance(m, layers.FastAttention) for m in language.modules())
    assert report.mlps == sum(isinstance(m, layers.FastGatedMLP) for m in language.modules())
    assert report.vision is not None
    _same_step(plain, fast)


def _projection(out_features: int, in_features: int) -> LoRAProjection:
    return LoRAProjection(weight=torch.randn(out_features, in_features, requires_grad=True))


def _kernel_outputs(op: str, x: torch.Tensor) -> list[torch.Tensor]:
    from fastft import kernels

    w = torch.rand(8, requires_grad=True)
    q, k = x.unsqueeze(1).expand(2, 2, 3, 8), x.unsqueeze(1)
    cos, sin = torch.rand(1, 3, 8), torch.rand(1, 3, 8)
    calls = {
        "lora_linear": lambda: [lora_linear(x, _projection(6, 8))],
        "lora_qkv": lambda: list(lora_qkv(x, _projection(8, 8), _projection(4, 8), _projection(4, 8))),
        "lora_mlp": lambda: [lora_mlp(x, _projection(12, 8), _projection(12, 8), _projection(8, 12), "swiglu")],
        "lora_ungated_mlp": lambda: [kernels.lora_ungated_mlp(x, _projection(12, 8), _projection(8, 12), "gelu")],
        "rms_norm": lambda: [kernels.rms_norm(x, w, 1e-6)],
        "rms_norm_gated": lambda: [kernels.rms_norm_gated(x, x * 2, w, 1e-6)],
        "layer_norm": lambda: [kernels.layer_norm(x, w, w, 1e-5)],
        "swiglu": lambda: [kernels.swiglu(x, x * 2)],
        "geglu": lambda: [kernels.geglu(x, x * 2)],
        "activation": lambda: [kernels.activation(x, "relu2")],
        "rope": lambda: list(kernels.rope(q, k, cos, sin)),
        "rope_interleaved": lambda: list(kernels.rope_interleaved(q, k, cos[..., :4], sin[..., :4])),
    }
    return calls[op]()


@pytest.mark.parametrize(
    "op",
    ["lora_linear", "lora_qkv", "lora_mlp", "lora_ungated_mlp", "rms_norm", "rms_norm_gated", "layer_norm", "swiglu",
     "geglu", "activation", "rope", "rope_interleaved"],
)  # fmt: skip
def test_kernels_return_tensors_the_caller_may_change_in_place(op):
    """Llama 4's shared expert adds in place to the MLP's output, XLM's attention to a LayerNorm's: autograd
    refuses in-place changes of views made inside a custom Function, so every kernel reshapes outside it."""
    x = torch.randn(2, 3, 8, requires_grad=True)
    outs = _kernel_outputs(op, x)
    expected = [out.detach().clone() + 1 for out in outs]
    for out in outs:
        out.add_(1)
    assert all(torch.equal(out.detach(), e) for out, e in zip(outs, expected))
    sum(out.sum() for out in outs).backward()
    assert x.grad is not None


# ------------------------------------------------------------------------------------------------ fused loss


@pytest.mark.parametrize(
    ("model_type", "overrides", "expected"),
    [
        ("granite", {"logits_scaling": 8.0}, {"logit_scale": 1 / 8.0}),  # logits / logits_scaling
        ("cohere", {"logit_scale": 0.25}, {"logit_scale": 0.25}),  # logits * logit_scale
        ("exaone", {}, {}),  # another model type that instantiates LlamaForCausalLM itself
        ("olmo2", {}, {}),
        ("gemma2", {"final_logit_softcapping": 5.0}, {"softcap": 5.0}),
    ],
)
def test_the_fused_loss_is_found_by_probing_the_head(model_type, overrides, expected):
    plain, fast = _patched_twin(model_type, **overrides)
    report = fast.fastft_report
    assert report.fused_loss, report.summary()
    head = report.head
    assert head.logit_scale == pytest.approx(expected.get("logit_scale")) if "logit_scale" in expected else True
    assert (head.softcap, head.logit_scale is None) == (expected.get("softcap"), "logit_scale" not in expected)
    out = fast(**_inputs())
    assert out.logits is None  # no batch x seq x vocab tensor in training
    _same_step(plain, fast)


def test_an_unknown_logit_transform_keeps_transformers_head():
    class ShiftedLlama(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            labels = kwargs.pop("labels", None)
            out = super().forward(*args, **kwargs)
            out.logits = out.logits + 1.0 + out.logits.square() * 0.01
            if labels is not None:
                out.loss = self.loss_function(out.logits, labels, self.config.vocab_size)
            return out

    plain = ShiftedLlama(tiny_config("llama")).train()
    fast = copy.deepcopy(plain)
    patch(fast)
    assert not fast.fastft_report.fused_loss
    assert "transformed" in fast.fastft_report.skipped["loss"]
    _same_step(plain, fast)


def test_the_router_loss_of_a_mixture_of_experts_is_kept():
    """Mixtral with output_router_logits adds router_aux_loss_coef * aux_loss to the loss: so must fastft."""
    plain, fast = _patched_twin("mixtral", output_router_logits=True, router_aux_loss_coef=0.5)
    assert fast.fastft_report.head.aux_loss_coef == 0.5
    out = fast(**_inputs())
    assert out.aux_loss is not None and out.logits is None
    _same_step(plain, fast)


def test_switching_the_router_loss_on_after_patching_falls_back_to_transformers():
    plain, fast = _patched_twin("mixtral")
    assert fast.fastft_report.head.aux_loss_coef is None
    _same_step(plain, fast, output_router_logits=True)


# ------------------------------------------------------------------------------------------------ the report


def test_the_report_names_each_block_left_on_transformers_code():
    # Qwen3.5-MoE: its routed experts run on fastft's kernel, its linear-attention mixer stays transformers'.
    _, fast = _patched_twin("qwen3_5_moe_text")
    skipped = fast.fastft_report.skipped
    assert any("linear-attention mixer" in reason for reason in skipped.values()), skipped
    assert not any("expert" in reason for reason in skipped.values()) and fast.fastft_report.experts > 0, skipped
    assert "left on transformers' code" in fast.fastft_report.summary()
