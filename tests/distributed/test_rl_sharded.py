"""fastft's RL trainers and TRL's DPO/GRPO on an FSDP2-sharded fastft model, 2 CPU ranks (gloo), one launch.

What runs on the ranks (each a tiny fastft-patched PEFT Llama, sharded by ``fastft.distributed.shard``):

- ORPO (``fastft.rl.ORPOTrainer``): ``compute_loss`` + backward of 2 of 4 preference pairs per rank, against one
  process scoring all 4. Every row has the same length and no padding, so each rank's token-mean NLL and pair-mean
  odds-ratio term are normalised like the whole batch's: the mean of the ranks' losses is the whole-batch loss
  and FSDP2's averaged gradients are its gradients. They differ by fp32 summation order only (2 rows per matmul
  instead of 4, one more reduction): loss asserted to 1e-6 relative, each LoRA gradient to 1e-5 of its largest
  entry (see the constants for the measured values); the metrics TRL gathers over ranks to 1e-5. Reading the
  sharded head outside ``run_in_root`` raises a NotImplementedError naming it.
- TRL's DPOTrainer and GRPOTrainer: 2 steps each through ``prepare_trainer`` (``trainer.model`` sharded after the
  trainer was built): finite losses, equal on both ranks, TRL's head calls routed to fastft's kernel.
- ``fastft.rl.PPOTrainer``: one iteration. Each rank samples its own completions (seeded by rank), so the ranks'
  gradients differ; the policy's are averaged by FSDP2, the replicated value head's by the trainer: both ranks
  end with identical LoRA and value-head weights, and the value head has moved away from its zero start.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.distributed.launch import run_ranks

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

PAIRS, PROMPT, LENGTH, WORLD = 4, 6, 20, 2
# fp32, same rows, summation order only. Measured: loss 6e-8 relative, LoRA gradients 9e-7 of each tensor's largest
# entry (backward through two layers amplifies the head's rounding, as in tests/rl/_preference.py), metrics 6e-8;
# the bounds are ~15x, ~10x and ~150x those.
LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-5  # of each gradient tensor's largest entry
METRIC_RTOL = 1e-5


def _peft_model() -> torch.nn.Module:
    from fastft import FastModel
    from tests.rl import _preference as pref

    # init_lora_weights=False: B starts random, so A and B both get gradients.
    return FastModel.get_peft_model(
        pref.model(0), r=4, lora_alpha=8, random_state=0, init_lora_weights=False, lora_dropout=0.0
    ).train()


def _orpo_batch() -> dict[str, torch.Tensor]:
    """4 pairs of unpadded rows of one length: a shared-length prompt (labels -100) and a response."""
    ids = torch.randint(3, 2000, (2, PAIRS, LENGTH), generator=torch.Generator().manual_seed(3))
    batch = {}
    for half, name in enumerate(("chosen", "rejected")):
        batch[f"{name}_input_ids"] = ids[half]
        batch[f"{name}_attention_mask"] = torch.ones_like(ids[half])
        batch[f"{name}_labels"] = ids[half].clone()
        batch[f"{name}_labels"][:, :PROMPT] = -100
    return batch


def _orpo(model: torch.nn.Module, out: str, rows: slice, sharded: bool) -> dict:
    """ORPOTrainer's loss of ``rows`` of the batch, the LoRA gradients (full tensors), the gathered metrics."""
    from torch.distributed.tensor import DTensor

    from fastft.distributed.sharding import shard
    from fastft.kernels import force_backend
    from fastft.rl.orpo import ORPOConfig, ORPOTrainer
    from tests.rl import _preference as pref
    from tests.rl.tiny import tokenizer

    args = ORPOConfig(**pref.common_args(out, beta=0.5))
    trainer = ORPOTrainer(model=model, args=args, train_dataset=pref.preference_pairs(4), processing_class=tokenizer())
    if sharded:
        shard(trainer.model)
    batch = {key: value[rows] for key, value in _orpo_batch().items()}
    with force_backend("torch"):
        loss, metrics = trainer.compute_loss(trainer.model, batch, return_outputs=True)
        loss.backward()
    refused = None
    if sharded:  # outside run_in_root the sharded head's weight is a shard: a clear error, not a wrong result
        from fastft.rl.heads import head_log_probs

        with pytest.raises(NotImplementedError) as error:
            head_log_probs(trainer.model, torch.zeros(1, 2, 64), torch.zeros(1, 2, dtype=torch.long))
        refused = str(error.value)
    grads = {}
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            grads[name] = grad.detach().clone()
    return {"loss": loss.item(), "grads": grads, "metrics": metrics, "refused": refused}


def _trl_run(kind: str, out: str) -> dict:
    """2 steps of TRL's DPO or GRPO trainer on the sharded model, through prepare_trainer."""
    import trl
    from datasets import Dataset

    from fastft.distributed import prepare_trainer
    from fastft.distributed.sharding import shard
    from fastft.kernels import force_backend
    from fastft.rl import trl_integration
    from tests.rl.tiny import instruction_pairs, tokenizer

    pairs = instruction_pairs(8)
    common = {
        "output_dir": out, "max_steps": 2, "learning_rate": 1e-3, "bf16": False, "report_to": "none",
        "use_cpu": True, "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True, "seed": 0,
        "dataloader_num_workers": 0,
    }  # fmt: skip
    if kind == "dpo":
        rows = [{"prompt": p["prompt"], "chosen": p["completion"], "rejected": pairs[(i + 3) % 8]["completion"]}
                for i, p in enumerate(pairs)]  # fmt: skip
        args = trl.DPOConfig(**common, per_device_train_batch_size=2, beta=0.5, max_length=64)
        trainer = trl.DPOTrainer(model=_peft_model(), args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer())  # fmt: skip
    else:

        def digits(completions, **kwargs) -> list[float]:
            return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]

        args = trl.GRPOConfig(**common, per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                              beta=0.1, generation_batch_size=8)  # fmt: skip
        trainer = trl.GRPOTrainer(model=_peft_model(), reward_funcs=digits, args=args, processing_class=tokenizer(),
                                  train_dataset=Dataset.from_list([{"prompt": p["prompt"]} for p in pairs]))  # fmt: skip
    shard(trainer.model)  # after the trainer was built (the README's order)
    prepare_trainer(trainer)
    before = dict(trl_integration.calls)
    with force_backend("torch"):
        trainer.train()
    routed = {k: trl_integration.calls[k] - before.get(k, 0) for k in ("fastft", "trl")}
    return {"loss": [h["loss"] for h in trainer.state.log_history if "loss" in h], "routed": routed}


def _ppo(rank: int, out: str) -> dict:
    """One PPO iteration on the sharded policy; the gathered LoRA weights and the value head afterwards."""
    from datasets import Dataset
    from torch.distributed.tensor import DTensor

    from fastft.distributed import prepare_trainer
    from fastft.distributed.sharding import shard
    from fastft.kernels import force_backend
    from fastft.rl.ppo_config import PPOConfig
    from fastft.rl.ppo_trainer import PPOTrainer
    from tests.rl.tiny import instruction_pairs, tokenizer

    def low_ids(prompts, completions, completion_ids, **kwargs) -> list[float]:
        return [sum(t < 256 for t in ids) / max(len(ids), 1) for ids in completion_ids]

    config = PPOConfig(
        output_dir=out, max_steps=1, per_device_train_batch_size=2, num_mini_batches=2, num_ppo_epochs=1,
        max_completion_length=6, learning_rate=1e-2, lr_scheduler_type="constant", report_to="none", use_cpu=True,
        save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, seed=0, kl_coef=0.05,
        max_grad_norm=1.0,
    )  # fmt: skip
    trainer = PPOTrainer(_peft_model(), low_ids, config, Dataset.from_list(instruction_pairs(8)), tokenizer())
    shard(trainer.model)
    prepare_trainer(trainer)
    torch.manual_seed(100 + rank)  # each rank samples its own completions: different gradients per rank
    with force_backend("torch"):
        trainer.train()
    lora = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in trainer.model.named_parameters() if p.requires_grad}  # fmt: skip
    value = {n: p.detach().clone() for n, p in trainer.value_head.named_parameters()}
    logged = [h for h in trainer.state.log_history if "loss" in h]
    return {"lora": lora, "value_head": value, "logged": logged}


def _ranks(rank: int, world_size: int, out: str) -> dict:
    half = PAIRS // world_size
    return {
        "orpo": _orpo(_peft_model(), f"{out}/orpo", slice(rank * half, (rank + 1) * half), sharded=True),
        "dpo": _trl_run("dpo", f"{out}/dpo"),
        "grpo": _trl_run("grpo", f"{out}/grpo"),
        "ppo": _ppo(rank, f"{out}/ppo"),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rl_sharded"))
    ranks = run_ranks(_ranks, WORLD, out)
    return {"ranks": ranks, "orpo_whole": _orpo(_peft_model(), f"{out}/whole", slice(None), sharded=False)}


def test_orpo_sharded_matches_one_process(runs):
    whole = runs["orpo_whole"]
    ranks = [r["orpo"] for r in runs["ranks"]]
    # Each rank's loss is the mean over its 2 pairs; their mean is the whole batch's.
    assert sum(r["loss"] for r in ranks) / WORLD == pytest.approx(whole["loss"], rel=LOSS_RTOL)
    for rank in ranks:
        assert rank["grads"].keys() == whole["grads"].keys() and len(whole["grads"]) > 0
        for name, expected in whole["grads"].items():
            scale = expected.abs().max().item()
            assert scale > 0, name
            assert (rank["grads"][name] - expected).abs().max().item() <= GRAD_RTOL * scale, name
        for key, expected in whole["metrics"].items():  # TRL gathers them over the ranks
            assert rank["metrics"][key] == pytest.approx(expected, rel=METRIC_RTOL, abs=1e-6), key
        assert "run_in_root" in rank["refused"] and "FSDP2" in rank["refused"]


@pytest.mark.parametrize("kind", ["dpo", "grpo"])
def test_trl_trainers_train_the_sharded_model(runs, kind):
    first, second = (r[kind] for r in runs["ranks"])
    assert len(first["loss"]) == 2 and all(math.isfinite(x) for x in first["loss"])
    assert first["loss"] == second["loss"]  # the trainer logs the loss averaged over the ranks
    assert first["routed"]["fastft"] > 0 and first["routed"]["trl"] == 0, first["routed"]


def test_ppo_ranks_stay_identical(runs):
    first, second = (r["ppo"] for r in runs["ranks"])
    assert len(first["logged"]) == 1 and math.isfinite(first["logged"][0]["loss"])
    # The ranks trained on different completions (their local metrics differ) ...
    assert first["logged"][0] != second["logged"][0]
    # ... and end with the same weights: FSDP2 averaged the policy's gradients, the trainer the value head's.
    for name, value in first["lora"].items():
        assert torch.equal(value, second["lora"][name]), name
    for name, value in first["value_head"].items():
        assert torch.equal(value, second["value_head"][name]), name
        assert value.abs().max() > 0, name  # the value head trained (it starts at zero)
