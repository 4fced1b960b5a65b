"""``fastft.patch`` against plain transformers + PEFT, family by family, on the same weights and inputs.

Tolerances: in fp32 fastft's kernels compute the same formulas in another order (fp32 accumulation, fused
steps), so losses, logits and gradients agree to ~1e-5 relative (measured: ~1e-7). In bf16 both sides round
at different places; fastft must be no further from a float64 run of the same model than plain bf16 is
(norm-wise, factor 2 — the contract in DESIGN.md).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from fastft.models import layers, rotary
from fastft.models.patch import patch
from tests.models.tiny import FAMILIES, batch, tiny_model, twins

FAMILY_NAMES = list(FAMILIES)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative difference ``||a - b|| / ||b||`` (one number per tensor, robust to tiny entries)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_grads(fast: torch.nn.Module, plain: torch.nn.Module) -> None:
    """Every trainable parameter's gradient within 1e-5 (norm-wise) of plain's, after both ran backward."""
    ref_grads, grads = _grads(plain), _grads(fast)
    assert ref_grads.keys() == grads.keys() and len(grads) > 0
    for name in ref_grads:
        assert _rel(grads[name], ref_grads[name]) < 1e-5, name


@pytest.fixture
def spy(monkeypatch):
    """Count the calls fastft's patched modules make into the kernels (proves the fast path really ran)."""
    counts: dict[str, int] = {}
    for home, name in (
        *((layers, n) for n in ("rms_norm", "lora_mlp", "lora_qkv", "lora_linear", "fused_linear_cross_entropy")),
        (rotary, "rope"),
    ):
        original = getattr(home, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(home, name, counting)
    return counts


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_matches_peft_fp32(family, spy):
    plain, fast = twins(family)
    patch(fast)
    spy.clear()  # the probes of patch() call the kernels too; count the training step only
    plain.train(), fast.train()
    inputs = batch()
    ref, out = plain(**inputs), fast(**inputs)
    assert out.logits is None, "training with labels must not build (batch, seq, vocab) logits"
    assert _rel(out.loss, ref.loss) < 1e-5
    ref.loss.backward()
    out.loss.backward()
    _assert_same_grads(fast, plain)
    n_layers = 2
    assert spy["rms_norm"] >= 2 * n_layers + 1
    assert spy["rope"] == n_layers and spy["lora_mlp"] == n_layers and spy["fused_linear_cross_entropy"] == 1
    assert spy.get("lora_qkv", 0) == (0 if family == "phi3" else n_layers)
    assert spy["lora_linear"] == (2 if family == "phi3" else 1) * n_layers  # o_proj (+ Phi-3's qkv_proj)

    plain.eval(), fast.eval()
    with torch.no_grad():
        inputs.pop("labels")
        assert _rel(fast(**inputs).logits, plain(**inputs).logits) < 1e-5


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_full_finetuning_matches_fp32(family):
    plain, fast = twins(family, lora=False)
    patch(fast)
    inputs = batch()
    plain(**inputs).loss.backward()
    fast(**inputs).loss.backward()
    ref_grads, grads = _grads(plain), _grads(fast)
    assert len(grads) == len(list(fast.parameters()))
    for name in ref_grads:
        assert grads[name] is not None, f"{name} got no gradient"
        assert _rel(grads[name], ref_grads[name]) < 1e-5, name


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_bf16_no_worse_than_plain_bf16(family):
    plain, fast = twins(family, dtype=torch.bfloat16)
    exact = copy.deepcopy(plain).double()
    patch(fast)
    inputs = batch()
    # transformers' eager attention in float64 turns fully masked (left-pad) query rows into NaN, so the
    # float64 oracle runs on unpadded rows; padding itself is covered by the fp32 tests.
    inputs.pop("attention_mask")
    losses = {}
    for name, model in (("plain", plain), ("fast", fast), ("exact", exact)):
        loss = model(**inputs).loss
        loss.backward()
        losses[name] = loss.detach()
    err = {k: (losses[k].double() - losses["exact"]).abs().item() for k in ("plain", "fast")}
    assert err["fast"] <= 2 * err["plain"] + 4 * 2**-8 * losses["exact"].abs().item()
    exact_grads, plain_grads, fast_grads = _grads(exact), _grads(plain), _grads(fast)
    for name, g in exact_grads.items():
        fast_err = (fast_grads[name].double() - g).norm().item()
        plain_err = (plain_grads[name].double() - g).norm().item()
        assert fast_err <= 2 * plain_err + 1e-3 * g.norm().item(), name


def test_patch_is_idempotent_and_survives_peft_twice():
    plain, fast = twins("llama")
    patch(fast)
    first = fast.fastft_report
    patch(fast)
    second = fast.fastft_report
    assert (first.norms, first.mlps, first.attentions, first.fused_loss) == (
        second.norms,
        second.mlps,
        second.attentions,
        second.fused_loss,
    )
    inputs = batch()
    assert _rel(fast(**inputs).loss, plain(**inputs).loss) < 1e-5


def test_patch_before_peft_then_peft_wraps():
    """A model patched first and wrapped by PEFT afterwards: the projections PEFT swapped in are fused too."""
    import peft

    from tests.models.tiny import lora_config

    base = tiny_model("llama")
    plain = peft.get_peft_model(copy.deepcopy(base), lora_config("llama"))
    fast = peft.get_peft_model(patch(base), lora_config("llama"))
    fast.load_state_dict(plain.state_dict())
    inputs = batch()
    assert _rel(fast(**inputs).loss, plain(**inputs).loss) < 1e-5


def test_disable_adapter_really_turns_lora_off():
    plain, fast = twins("llama")
    patch(fast)
    inputs = batch()
    with fast.disable_adapter():
        off = fast(**inputs).loss
    on = fast(**inputs).loss
    with plain.disable_adapter():
        ref_off = plain(**inputs).loss
    assert _rel(off, ref_off) < 1e-5
    assert (on - off).abs() > 1e-3, "the adapters are random and non-zero: turning them off must change the loss"


def test_set_adapter_switches_the_fused_path():
    plain, fast = twins("llama")
    from tests.models.tiny import lora_config

    torch.manual_seed(3)
    plain.add_adapter("second", lora_config("llama", r=2))
    fast.add_adapter("second", lora_config("llama", r=2))
    fast.load_state_dict(plain.state_dict())
    patch(fast)
    inputs = batch()
    for adapter in ("second", "default"):
        plain.set_adapter(adapter)
        fast.set_adapter(adapter)
        assert _rel(fast(**inputs).loss, plain(**inputs).loss) < 1e-5, adapter


def test_lora_dropout_falls_back_correctly():
    plain, fast = twins("llama", lora_dropout=0.3)
    patch(fast)
    inputs = batch()
    torch.manual_seed(11)
    ref = plain(**inputs).loss
    torch.manual_seed(11)
    out = fast(**inputs).loss
    assert _rel(out, ref) < 1e-5


def test_dora_falls_back_correctly():
    plain, fast = twins("llama", use_dora=True)
    patch(fast)
    inputs = batch()
    ref, out = plain(**inputs).loss, fast(**inputs).loss
    ref.backward()
    out.backward()
    assert _rel(out, ref) < 1e-5
    _assert_same_grads(fast, plain)


def test_num_items_in_batch_matches_transformers():
    plain, fast = twins("qwen3")
    patch(fast)
    inputs = batch()
    for n in (7, torch.tensor(31)):
        assert _rel(fast(**inputs, num_items_in_batch=n).loss, plain(**inputs, num_items_in_batch=n).loss) < 1e-5


def test_eval_with_labels_and_return_dict_false_keep_transformers_outputs():
    plain, fast = twins("gemma2")
    patch(fast)
    inputs = batch()
    plain.eval(), fast.eval()
    ref, out = plain(**inputs), fast(**inputs)
    assert out.logits is not None and _rel(out.logits, ref.logits) < 1e-5 and _rel(out.loss, ref.loss) < 1e-5
    fast.train(), plain.train()
    as_tuple = fast(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and _rel(as_tuple[0], plain(**inputs).loss) < 1e-5


def test_caller_can_ask_for_logits_in_training():
    plain, fast = twins("llama")
    patch(fast)
    fast.get_base_model().fastft_return_logits = True
    inputs = batch()
    out, ref = fast(**inputs), plain(**inputs)
    assert out.logits is not None and _rel(out.logits, ref.logits) < 1e-5


def test_packed_sequences_equal_padded_batch():
    model = patch(tiny_model("llama"))
    gen = torch.Generator().manual_seed(2)
    first, second = torch.randint(3, 128, (7,), generator=gen), torch.randint(3, 128, (5,), generator=gen)
    padded = torch.zeros(2, 7, dtype=torch.long)
    padded[0], padded[1, :5] = first, second
    mask = (torch.arange(7) < torch.tensor([[7], [5]])).long()
    labels = padded.masked_fill(mask == 0, -100)
    packed = torch.cat((first, second))[None]
    position_ids = torch.cat((torch.arange(7), torch.arange(5)))[None]
    packed_labels = packed.clone()
    packed_labels[0, 7] = -100  # the first token of the second sequence is not a target of the first
    loss_padded = model(input_ids=padded, attention_mask=mask, labels=labels).loss
    # use_cache=False as trainers pass it: transformers only derives the block-diagonal mask without a cache
    loss_packed = model(input_ids=packed, position_ids=position_ids, labels=packed_labels, use_cache=False).loss
    assert _rel(loss_packed, loss_padded) < 1e-5


def test_checkpointing_calls_of_trainers_still_work():
    plain, fast = twins("llama")
    patch(fast)
    for model in (plain, fast):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    inputs = batch()
    ref, out = plain(**inputs).loss, fast(**inputs).loss
    ref.backward()
    out.backward()
    _assert_same_grads(fast, plain)
    fast.gradient_checkpointing_disable()
    assert _rel(fast(**inputs).loss, ref) < 1e-5


class _UnknownLM(torch.nn.Module):
    """A model with a config and nothing fastft knows: no norm, MLP or attention, and a loss that is not the
    shifted cross-entropy of its logits (it scores each position against its own token)."""

    def __init__(self):
        super().__init__()
        import transformers

        self.config = transformers.PretrainedConfig(model_type="unknown-lm")
        self.embed, self.mix, self.head = (
            torch.nn.Embedding(64, 16),
            torch.nn.Conv1d(16, 16, 1),
            torch.nn.Linear(16, 64),
        )

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, labels=None):
        from transformers.modeling_outputs import CausalLMOutput

        logits = self.head(self.mix(self.embed(input_ids).transpose(1, 2)).transpose(1, 2))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return CausalLMOutput(loss=loss, logits=logits)


def test_unknown_architecture_runs_unpatched_with_one_warning(caplog):
    model = _UnknownLM().eval()
    reference = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="fastft"):
        patch(model)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "fastft"]
    assert len(warnings) == 1 and "unpatched" in warnings[0].getMessage()
    ids = torch.randint(0, 64, (1, 8))
    assert torch.equal(model(ids, labels=ids).loss, reference(ids, labels=ids).loss)


def test_patch_rejects_what_is_not_a_model():
    with pytest.raises(TypeError, match="nn.Module"):
        patch("meta-llama/Llama-3.1-8B")
    with pytest.raises(TypeError, match="config"):
        patch(torch.nn.Linear(2, 2))


def test_patched_forward_keeps_its_signature():
    """The HF Trainer keeps the dataset columns the model's forward names: the signature must survive."""
    import inspect

    plain, fast = twins("llama")
    patch(fast)
    names = list(inspect.signature(fast.get_base_model().forward).parameters)
    assert names == list(inspect.signature(plain.get_base_model().forward).parameters)
    assert {"input_ids", "attention_mask", "labels"} <= set(names)


@pytest.mark.parametrize("mode", ["standard", "offload"])
def test_checkpointing_modes_keep_fastft_gradients(mode, spy):
    """fastft's kernels inside checkpointed layers (recomputed in backward) give plain PEFT's gradients."""
    from fastft.models.checkpointing import set_checkpointing

    plain, fast = twins("llama")
    patch(fast)
    set_checkpointing(fast, mode)
    inputs = batch()
    ref, out = plain(**inputs).loss, fast(**inputs).loss
    ref.backward()
    out.backward()
    assert _rel(out, ref) < 1e-5
    _assert_same_grads(fast, plain)
    assert spy["lora_mlp"] == 2 * 2, "each layer's fused MLP runs in forward and again in the recompute"
