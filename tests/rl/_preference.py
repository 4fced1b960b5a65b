"""Shared set-up of the ORPO/CPO tests: preference pairs, twin trainers (TRL's and fastft's), comparisons.

Both trainers of a pair get the same initial weights (one seed), the same config and the same dataset; TRL's
constructor seeds before adding a PEFT adapter, so LoRA adapters are identical too. The adapters are initialised
randomly (``init_lora_weights=False``): with PEFT's zero B, every LoRA A gradient would be 0 and prove nothing.

Tolerance (fp32): the two trainers compute the same formulas from the same hidden states; they differ only in how
the head's logits are reduced (TRL: full (N, V) log-softmax; fastft: chunked, with its own online log-sum-exp) and
so in fp32 summation order, ~1e-6 relative per value. Losses must agree to 1e-5 relative; logged metrics to 1e-5
relative or 1e-5 absolute (margins and log-odds are differences of log-probs of size 1-10, so they carry the
log-probs' absolute error); each gradient tensor to 5e-5 of its largest entry (a max-normalised error: entries near
0 carry only absolute error; backward through two attention layers amplifies the head's differences, measured up
to 1.3e-5 for q_proj).
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from tests.rl.tiny import instruction_pairs, tiny_llama, tokenizer

peft = pytest.importorskip("peft")

RTOL = 1e-5
GRAD_RTOL = 5e-5
N_PAIRS = 8


def preference_pairs(n: int = N_PAIRS) -> Dataset:
    """{"prompt", "chosen", "rejected"}: the shipped response is chosen, another prompt's response rejected."""
    pairs = instruction_pairs(n)
    rows = [
        {"prompt": p["prompt"], "chosen": p["completion"], "rejected": pairs[(i + 3) % n]["completion"]}
        for i, p in enumerate(pairs)
    ]
    return Dataset.from_list(rows)


def model(seed: int = 0, **config) -> torch.nn.Module:
    """The tiny Llama with one random vector added to every row of its head, so the mean logit is O(1)."""
    m = tiny_llama(seed, **config)
    with torch.no_grad():
        m.lm_head.weight += 0.5 * torch.randn(m.lm_head.weight.shape[1], generator=torch.Generator().manual_seed(7))
    return m


def lora_config():
    return peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0,
        init_lora_weights=False, task_type="CAUSAL_LM",
    )  # fmt: skip


def common_args(tmp_path, **overrides) -> dict:
    """Small, fast, reproducible, fp32 (TRL's configs default to bf16 mixed precision; tests that want it say so)."""
    settings = {
        "output_dir": str(tmp_path), "report_to": "none", "use_cpu": True, "max_steps": 3, "seed": 0, "bf16": False,
        "per_device_train_batch_size": 4, "learning_rate": 1e-3, "save_strategy": "no", "logging_steps": 1,
        "disable_tqdm": True, "dataloader_num_workers": 0, "max_length": 128,
    }  # fmt: skip
    return settings | overrides


def twins(trl_cls, fast_cls, args, *, use_peft: bool = False, make_model=model, dataset=None, **kwargs):
    """(TRL's trainer, fastft's trainer) on twin models and one dataset; ``kwargs`` go to both constructors."""
    dataset = preference_pairs() if dataset is None else dataset
    return tuple(
        cls(
            model=make_model(),
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer(),
            peft_config=lora_config() if use_peft else None,
            **kwargs,
        )
        for cls in (trl_cls, fast_cls)
    )


def first_batch(trainer) -> dict:
    return next(iter(trainer.get_train_dataloader()))


def loss_grads_metrics(trainer, batch) -> tuple[float, dict[str, torch.Tensor], dict[str, float]]:
    """The loss of ``batch`` (TRL's get_batch_loss_metrics), the gradient of every trainable parameter, the metrics."""
    trainer.model.zero_grad(set_to_none=True)
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.model.zero_grad(set_to_none=True)
    return loss.item(), grads, metrics


def assert_same_step(trl_trainer, fast_trainer, batch) -> None:
    """Loss, every trainable parameter's gradient and every logged metric of one batch agree (see RTOL)."""
    trl_loss, trl_grads, trl_metrics = loss_grads_metrics(trl_trainer, batch)
    fast_loss, fast_grads, fast_metrics = loss_grads_metrics(fast_trainer, batch)
    assert fast_loss == pytest.approx(trl_loss, rel=RTOL)
    assert trl_grads.keys() == fast_grads.keys() and len(trl_grads) > 0
    for name, expected in trl_grads.items():
        scale = expected.abs().max().item()
        assert scale > 0, name  # a gradient that is 0 everywhere would not test anything
        error = (fast_grads[name] - expected).abs().max().item()
        assert error <= GRAD_RTOL * scale, (name, error, scale)
    assert fast_metrics.keys() == trl_metrics.keys()
    for key, expected in trl_metrics.items():
        assert fast_metrics[key] == pytest.approx(expected, rel=RTOL, abs=1e-5), key


def train_history(trainer) -> list[dict]:
    torch.manual_seed(0)  # the sampler's shuffle draws from the global generator
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


def assert_same_history(trl_trainer, fast_trainer, steps: int) -> None:
    """Per-step logged loss and metrics of a short run agree: in fp32 to 2e-4 relative (Adam's normalised steps
    carry the ~1e-6 per-step differences forward at that size; the tiny model's values are O(1-10))."""
    expected, actual = train_history(trl_trainer), train_history(fast_trainer)
    assert len(expected) == len(actual) == steps
    for step, (e, a) in enumerate(zip(expected, actual)):
        assert e.keys() == a.keys()
        for key in e:
            if key in ("epoch", "step", "learning_rate"):
                assert a[key] == e[key]
            else:
                assert a[key] == pytest.approx(e[key], rel=2e-4, abs=1e-6), (step, key, e[key], a[key])
