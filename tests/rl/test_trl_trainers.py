"""Unmodified TRL trainers on a fastft model vs the same run on the plain model: the same numbers, fastft's head.

Each case trains a few steps twice from one seed and one set of initial weights, once on the plain transformers
(+ PEFT) model and once on the same model patched by fastft, and compares what TRL logs per step. fastft's
kernels differ from torch's only in fp32 summation order (~1e-6 relative per op). Training uses SGD: Adam
divides by the gradient's own size, so on elements whose exact gradient is ~0 it turns 1e-9 of rounding noise
into a full step and the runs drift apart for reasons unrelated to fastft. With SGD differences propagate
linearly, and per-step values must agree to 2e-4 relative (+1e-5 absolute for values near 0). Every fastft run must route TRL's chunked log-prob
calls through fastft's kernel (counted) and every plain run through TRL's own.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

import fastft
from fastft.kernels import force_backend
from fastft.rl import trl_integration
from tests.rl.tiny import instruction_pairs, tiny_llama, tokenizer

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _torch_path():
    """The kernels' torch path (same hand-written backward; the Triton kernels are checked in tests/kernels):
    Triton's interpreter would make each trainer step take seconds."""
    with force_backend("torch"):
        yield


RTOL, ATOL = 2e-4, 1e-5
STEPS = 3


def _common(tmp_path, **overrides) -> dict:
    settings = {
        "output_dir": str(tmp_path), "max_steps": STEPS, "per_device_train_batch_size": 4, "learning_rate": 0.05,
        "optim": "sgd", "bf16": False, "report_to": "none", "use_cpu": True, "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True, "seed": 0,
        "dataloader_num_workers": 0,
    }  # fmt: skip
    settings.update(overrides)
    return settings


def _lora(model):
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                             lora_dropout=0.0, task_type="CAUSAL_LM")  # fmt: skip
    torch.manual_seed(1)
    return peft.get_peft_model(model, config)


def _twins(use_peft: bool):
    plain = tiny_llama(0)
    fast = copy.deepcopy(plain)
    fastft.patch(fast)
    if use_peft:
        plain, fast = _lora(plain), _lora(fast)
    return plain, fast


def _history(trainer) -> list[dict]:
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


def _run(make_trainer, model, expect_route: str) -> list[dict]:
    before = dict(trl_integration.calls)
    torch.manual_seed(0)
    history = _history(make_trainer(model))
    routed = {k: trl_integration.calls[k] - before.get(k, 0) for k in ("fastft", "trl")}
    other = "trl" if expect_route == "fastft" else "fastft"
    assert routed[expect_route] > 0 and routed[other] == 0, routed
    return history


def _compare(plain_history, fast_history, keys, rtol=RTOL, atol=ATOL) -> None:
    assert len(plain_history) == len(fast_history) == STEPS
    for key in keys:  # online trainers log rewards only on the steps that generate
        assert any(key in p for p in plain_history), key
    for step, (p, f) in enumerate(zip(plain_history, fast_history)):
        for key in keys:
            assert (key in p) == (key in f), (step, key)
            if key in p:
                assert f[key] == pytest.approx(p[key], rel=rtol, abs=atol), (step, key, p[key], f[key])


def _texts(n=16):
    return [{"text": p["prompt"] + p["completion"]} for p in instruction_pairs(n)]


def _messages(n=16):
    return [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["completion"]}]}
            for p in instruction_pairs(n)]  # fmt: skip


def _preferences(n=16):
    pairs = instruction_pairs(n)
    return [{"prompt": p["prompt"], "chosen": p["completion"], "rejected": pairs[(i + 5) % n]["completion"]}
            for i, p in enumerate(pairs)]  # fmt: skip


@pytest.mark.parametrize(
    "variant, rows, extra",
    [
        ("plain_text", _texts, {}),
        ("conversational_assistant_only", _messages, {"assistant_only_loss": True}),
        ("prompt_completion", instruction_pairs, {}),
        ("packing", _texts, {"packing": True, "max_length": 96}),
    ],
)
def test_sft(tmp_path, variant, rows, extra):
    plain, fast = _twins(use_peft=False)
    dataset = Dataset.from_list(rows(16))

    def make(model):
        args = trl.SFTConfig(**_common(tmp_path, **extra))
        tok = tokenizer(training_template=True)
        return trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)

    p, f = _run(make, plain, "trl"), _run(make, fast, "fastft")
    _compare(p, f, ["loss", "entropy", "mean_token_accuracy", "grad_norm"])


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16_autocast"])
def test_dpo_peft(tmp_path, bf16):
    """Also under TRL's default ``bf16=True`` (CPU autocast). Both runs then round to bf16 (unit roundoff 2^-9)
    in different places (fastft's fused kernels keep fp32 intermediates that autocast rounds), so they agree to
    that precision: 1e-2 relative on the loss, the summed log-probs and the gradient norm. The rewards are
    beta * (policy - reference) log-prob differences of ~0.03 between sums of ~-150, i.e. cancellations far
    below bf16's resolution of the terms, and are compared in fp32 only."""
    plain, fast = _twins(use_peft=True)
    dataset = Dataset.from_list(_preferences())

    def make(model):
        args = trl.DPOConfig(**_common(tmp_path, beta=0.5, max_length=128, bf16=bf16))
        return trl.DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer())

    p, f = _run(make, plain, "trl"), _run(make, fast, "fastft")
    if bf16:
        _compare(p, f, ["loss", "logps/chosen", "logps/rejected", "grad_norm"], rtol=1e-2, atol=1e-3)
    else:
        _compare(p, f, ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "grad_norm"])
    assert abs(f[-1]["rewards/margins"]) > 1e-4  # the policy moved away from the reference


def test_reference_pass_runs_fastft_with_the_adapter_off():
    """TRL's reference pass of a PEFT model (``use_adapter(model, None)``, i.e. ``disable_adapter()``) goes through
    fastft's head and layers and gives the base model's log-probs, not the adapted ones."""
    from trl.trainer.utils import add_fused_lm_head, use_adapter

    base = tiny_llama(0)
    fast = copy.deepcopy(base)
    fastft.patch(fast)
    fast = _lora(fast)
    with torch.no_grad():
        for name, param in fast.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)  # an adapter that changes the outputs
    add_fused_lm_head(base)
    add_fused_lm_head(fast.get_base_model())
    ids = torch.randint(3, 2000, (2, 24))
    labels = ids.masked_fill(torch.arange(24) < 6, -100)
    before = trl_integration.calls["fastft"]
    with torch.no_grad(), force_backend("torch"):
        expected = base(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        adapted = fast(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        with use_adapter(fast, adapter_name=None):
            reference = fast(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    assert trl_integration.calls["fastft"] == before + 2
    # fp32, different summation order only: 1e-5 absolute on log-probs of about -7.6
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-5)
    assert (adapted - expected).abs().max() > 1e-2


def test_kto(tmp_path):
    plain, fast = _twins(use_peft=True)
    pairs = instruction_pairs(16)
    rows = [{"prompt": p["prompt"], "completion": p["completion"] if i % 2 == 0 else pairs[(i + 3) % 16]["completion"],
             "label": i % 2 == 0} for i, p in enumerate(pairs)]  # fmt: skip
    dataset = Dataset.from_list(rows)

    def make(model):
        args = trl.KTOConfig(**_common(tmp_path, max_length=128))
        return trl.KTOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer())

    p, f = _run(make, plain, "trl"), _run(make, fast, "fastft")
    _compare(p, f, ["loss", "grad_norm"])


def _digits_reward(completions, **kwargs) -> list[float]:
    """A deterministic toy reward: the share of digits in the completion."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_online_rl(tmp_path, name):
    plain, fast = _twins(use_peft=True)
    dataset = Dataset.from_list([{"prompt": p["prompt"]} for p in instruction_pairs(8)])
    config_cls, trainer_cls = (trl.GRPOConfig, trl.GRPOTrainer) if name == "grpo" else (trl.RLOOConfig, trl.RLOOTrainer)

    def make(model):
        args = config_cls(**_common(tmp_path, num_generations=4, max_completion_length=12, beta=0.1,
                                    generation_batch_size=8))  # fmt: skip
        return trainer_cls(model=model, reward_funcs=_digits_reward, args=args, train_dataset=dataset,
                           processing_class=tokenizer())  # fmt: skip

    p, f = _run(make, plain, "trl"), _run(make, fast, "fastft")
    keys = ["loss", "reward", "kl"] if name == "grpo" else ["loss", "reward"]
    _compare(p, f, keys)


def test_reference_reloaded_from_path_is_patched(tmp_path):
    tiny_llama(0).save_pretrained(tmp_path / "model")
    tokenizer().save_pretrained(tmp_path / "model")
    model, _ = fastft.FastModel.from_pretrained(str(tmp_path / "model"), dtype=torch.float32)
    dataset = Dataset.from_list(_preferences(8))
    args = trl.DPOConfig(**_common(tmp_path, max_steps=1, max_length=128))
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer())
    assert trainer.ref_model is not None and trainer.ref_model is not model
    assert hasattr(trainer.ref_model, "fastft_report") and trainer.ref_model.fastft_report.fused_loss
    before = trl_integration.calls["trl"]
    trainer.train()
    assert trl_integration.calls["trl"] == before  # policy and reference both went through fastft's head


def test_other_models_keep_trl_head():
    """A model that was never patched is scored by TRL's own function even after the hooks are installed."""
    trl_integration.install()
    from trl.trainer import utils

    assert isinstance(utils._ChunkedLogProbFunction, trl_integration._Dispatcher)
    hidden = torch.randn(5, 16, requires_grad=True)
    weight = torch.randn(40, 16)
    labels = torch.randint(0, 40, (5,))
    before = dict(trl_integration.calls)
    out = utils._ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, 4096, None, 1.0, ("log_probs",))
    original = utils._ChunkedLogProbFunction.original.apply(
        hidden, weight, None, labels, 1.0, 4096, None, 1.0, ("log_probs",)
    )
    assert trl_integration.calls["trl"] == before.get("trl", 0) + 1
    assert trl_integration.calls["fastft"] == before.get("fastft", 0)
    torch.testing.assert_close(out[0], original[0], rtol=0, atol=0)


def test_lora_on_the_output_head_is_refused_not_ignored():
    from fastft.rl import causal_log_probs

    model = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(NotImplementedError, match="LoRA adapter on lm_head"):
        causal_log_probs(model, torch.randint(3, 2000, (1, 8)))
    saved = peft.get_peft_model(
        tiny_llama(0), peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    ids = torch.randint(3, 2000, (1, 8))
    with torch.no_grad():
        saved.base_model.model.lm_head.modules_to_save["default"].weight.mul_(2.0)  # the trained copy differs
        expected = saved(input_ids=ids).logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        got = causal_log_probs(saved, ids).log_probs
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_hooks_install_when_trl_is_imported_after_patching():
    """In a fresh interpreter: patch first, import TRL later; the hooks land right after TRL's utilities load."""
    script = """
import sys
import fastft
from tests.rl.tiny import tiny_llama
fastft.patch(tiny_llama(0))
assert "trl.trainer.utils" not in sys.modules
import trl.trainer.dpo_trainer as dpo
import trl.trainer.utils as utils
from fastft.rl import trl_integration
assert isinstance(utils._ChunkedLogProbFunction, trl_integration._Dispatcher)
assert getattr(dpo.create_model_from_path, "_fastft_hook", False)
assert dpo.create_model_from_path is utils.create_model_from_path
assert not any(isinstance(f, trl_integration._InstallAfterImport) for f in sys.meta_path)
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "0", "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300, env=env, cwd=root
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
