"""fastft.rl.ORPOTrainer against trl.experimental.orpo.ORPOTrainer: same loss, gradients, metrics, no full logits.

Tolerances are those of tests/rl/_preference.py (fp32, the two differ only in the head's summation order).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

import fastft
from fastft.kernels._dispatch import force_backend
from tests.rl import _preference as pref
from tests.rl.tiny import tokenizer

pytest.importorskip("trl")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.orpo import ORPOTrainer as TRLORPOTrainer

from fastft.rl.orpo import ORPOConfig, ORPOTrainer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def _args(tmp_path, **overrides) -> ORPOConfig:
    return ORPOConfig(**pref.common_args(tmp_path, beta=0.5, **overrides))


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("kernel", ["triton", "torch"])
def test_loss_gradients_and_metrics_equal_trl(tmp_path, use_peft, kernel):
    trl_trainer, fast_trainer = pref.twins(TRLORPOTrainer, ORPOTrainer, _args(tmp_path), use_peft=use_peft)
    batch = pref.first_batch(trl_trainer)
    # The batch has padding in both halves and prompts of several lengths: label masking is exercised.
    assert (batch["chosen_attention_mask"] == 0).any() and (batch["rejected_attention_mask"] == 0).any()
    with force_backend(kernel):
        pref.assert_same_step(trl_trainer, fast_trainer, batch)


@pytest.mark.parametrize("patched", [False, True], ids=["plain", "fastft-patched"])
def test_training_steps_equal_trl(tmp_path, patched):
    # With fastft.patch the backbone runs fastft's layer kernels too (fp32 summation order again): same tolerance.
    def make_model():
        return fastft.patch(pref.model()) if patched else pref.model()

    trl_trainer, _ = pref.twins(TRLORPOTrainer, ORPOTrainer, _args(tmp_path))
    _, fast_trainer = pref.twins(TRLORPOTrainer, ORPOTrainer, _args(tmp_path), make_model=make_model)
    with force_backend("torch"):
        pref.assert_same_history(trl_trainer, fast_trainer, steps=3)


def test_evaluation_equals_trl(tmp_path):
    args = _args(tmp_path, per_device_eval_batch_size=4)
    trl_trainer, fast_trainer = pref.twins(TRLORPOTrainer, ORPOTrainer, args, eval_dataset=pref.preference_pairs())
    with force_backend("torch"):
        expected, actual = trl_trainer.evaluate(), fast_trainer.evaluate()
    assert "eval_logits/chosen" in expected and expected.keys() == actual.keys()
    for key in expected:
        if not key.endswith(("runtime", "per_second", "preparation_time")):  # timings
            assert actual[key] == pytest.approx(expected[key], rel=pref.RTOL, abs=1e-5), key


def test_mixed_precision_runs_in_trls_autocast(tmp_path):
    # TRL's configs default to bf16=True: accelerate runs model.forward under bf16 autocast, and fastft's trainer
    # must run its backbone and head in the same autocast, not silently in fp32 (whose loss here is 2e-4 away).
    # Both then score the same bf16-rounded logits in fp32: the first step's loss agrees to fp32 rounding; the
    # other metrics to 1e-3 (mean logits from fp32 h @ mean(W) against the mean of bf16-rounded logits; gradient
    # norm through two different bf16 backward paths). Later steps are not compared: bf16 gradient differences
    # move the mean logit by O(10%) per Adam step at this learning rate, for TRL against itself in fp32 as well.
    trl_trainer, fast_trainer = pref.twins(TRLORPOTrainer, ORPOTrainer, _args(tmp_path, bf16=True, max_steps=1))
    with force_backend("torch"):
        (expected,), (actual,) = pref.train_history(trl_trainer), pref.train_history(fast_trainer)
    assert actual["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], rel=1e-3, abs=1e-5), key


def test_chosen_labels_that_differ_from_the_inputs_are_scored_as_labelled(tmp_path):
    # A custom collator may label a chosen token with something else than its input id: the odds ratio must use
    # the label (TRL's get_batch_logps) while the NLL keeps the input ids; fastft then scores the chosen rows twice.
    trl_trainer, fast_trainer = pref.twins(TRLORPOTrainer, ORPOTrainer, _args(tmp_path))
    batch = pref.first_batch(trl_trainer)
    labels = batch["chosen_labels"]
    position = (labels != -100).nonzero()[0]
    labels[position[0], position[1]] = (labels[position[0], position[1]] + 1) % len(tokenizer())
    with force_backend("torch"):
        pref.assert_same_step(trl_trainer, fast_trainer, batch)


def _tiny_gemma2() -> Gemma2ForCausalLM:
    tok = tokenizer()
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, final_logit_softcapping=2.0, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():  # logits of a few units, so the softcap of 2 bends them and their mean is not ~0
        model.lm_head.weight.add_(0.5 * torch.randn(64, generator=torch.Generator().manual_seed(7)))
    return model


def test_softcapped_logits_give_trl_metrics(tmp_path):
    # Gemma 2 softcaps its logits: the mean logit is no longer linear in the hidden state and comes from a
    # chunked stats pass instead; loss, gradients and logits/* metrics still match TRL's full logits.
    trl_trainer, fast_trainer = pref.twins(TRLORPOTrainer, ORPOTrainer, _args(tmp_path), make_model=_tiny_gemma2)
    batch = pref.first_batch(trl_trainer)
    with force_backend("torch"):
        pref.assert_same_step(trl_trainer, fast_trainer, batch)
        _, metrics = fast_trainer.get_batch_loss_metrics(fast_trainer.model, batch)
    assert abs(metrics["logits/chosen"]) > 0.1  # the comparison above was on a mean that the softcap shapes


# ------------------------------------------------------------------------------------------------ memory


def _saved_for_backward(trainer, batch) -> list[tuple[int, tuple[int, ...], int]]:
    """(storage pointer, shape, storage bytes) of every non-parameter tensor autograd saves in one loss forward."""
    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    saved = []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved.append((ptr, tuple(t.shape), t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.get_batch_loss_metrics(trainer.model, batch)
    return saved


def _scaled_llama() -> LlamaForCausalLM:
    """Llama-3-8B proportions scaled down as in benchmarks/memory.py (hidden 1024, 3.5x MLP, GQA 4:1, vocab 32000),
    bf16; the ids the tokenizer makes (< 2048) are a subset of the vocabulary."""
    tok = tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=128, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(torch.bfloat16)


def test_no_batch_seq_vocab_tensor_is_saved(tmp_path):
    trl_trainer, fast_trainer = pref.twins(TRLORPOTrainer, ORPOTrainer, _args(tmp_path), make_model=_scaled_llama)
    batch = pref.first_batch(trl_trainer)
    rows = 2 * batch["chosen_input_ids"].shape[0]
    seq = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    with force_backend("torch"):  # the Triton path saves the same tensors; the interpreter is slow at V=32000
        trl_saved, fast_saved = _saved_for_backward(trl_trainer, batch), _saved_for_backward(fast_trainer, batch)

    def vocab_sized(saved) -> int:  # elements of the distinct saved storages whose last dimension is the vocabulary
        return sum({ptr: torch.Size(shape).numel() for ptr, shape, _ in saved if shape and shape[-1] == 32000}.values())

    def total(saved) -> int:
        return sum({ptr: nbytes for ptr, _, nbytes in saved}.values())

    # TRL keeps log-softmaxes of its (2B, T, V) logits: bf16 logits go through selective_log_softmax row by row,
    # so it saves 2B (T - 1, V) tensors, plus the chosen half's for the NLL (cross-entropy).
    assert vocab_sized(trl_saved) >= rows * (seq - 1) * 32000
    assert vocab_sized(fast_saved) == 0
    # The same backbone saves the same activations for both: fastft's total is TRL's minus the vocabulary part
    # (measured 60.3 MB against 110.7 MB, 49.9 MB of it vocabulary-sized).
    assert total(fast_saved) < total(trl_saved) - vocab_sized(trl_saved) * 2 * 0.95


# ------------------------------------------------------------------------------------------------ errors


def test_router_aux_loss_is_refused(tmp_path):
    def moe_flagged():
        return pref.model(output_router_logits=True, router_aux_loss_coef=0.01)

    _, fast_trainer = pref.twins(TRLORPOTrainer, ORPOTrainer, _args(tmp_path), make_model=moe_flagged)
    with pytest.raises(NotImplementedError, match="output_router_logits"):
        fast_trainer.get_batch_loss_metrics(fast_trainer.model, pref.first_batch(fast_trainer))


def test_encoder_decoder_is_refused(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    tok = tokenizer()
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                      decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        ORPOTrainer(model=T5ForConditionalGeneration(config), args=_args(tmp_path, max_completion_length=32),
                    train_dataset=pref.preference_pairs(2), processing_class=tok)  # fmt: skip


def test_missing_trl_is_reported_with_the_install_command(monkeypatch):
    for name in ("trl", "trl.experimental", "trl.experimental.orpo"):
        monkeypatch.setitem(sys.modules, name, None)  # `import trl` now raises ImportError
    monkeypatch.delitem(sys.modules, "fastft.rl.orpo")
    with pytest.raises(ImportError, match="pip install -U trl"):
        importlib.import_module("fastft.rl.orpo")


# ------------------------------------------------------------------------------------------------ example


def test_example_trains_without_calling_the_lm_head(tmp_path, monkeypatch):
    # examples/orpo.py as a user runs it (CPU: fastft's torch path), two steps on the embedded model and data.
    spec = importlib.util.spec_from_file_location("orpo_example", ROOT / "examples" / "orpo.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    head_calls = []
    load_model = example.load_model

    def counted(*args, **kwargs):
        model, tok = load_model(*args, **kwargs)
        model.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
        return model, tok

    monkeypatch.setattr(example, "load_model", counted)
    with force_backend("torch"):
        trainer = example.main(["--steps", "2", "--output-dir", str(tmp_path)])
    logged = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    assert isinstance(trainer, ORPOTrainer) and {"nll_loss", "log_odds_chosen"} <= logged[0].keys()
    assert head_calls == []  # the (batch, seq, vocab) logits were never computed
    rows = example.preference_pairs()
    assert len(rows) == 500 and all(r["chosen"] != r["rejected"] for r in rows)
