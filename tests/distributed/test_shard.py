"""fastft under FSDP2 (fastft.distributed.shard) and DDP on 2 CPU ranks (gloo) against one process.

One launch (tests/distributed/launch.py) runs every distributed case on both ranks; the single-process references
run in the test process. Data: a fixed global batch of 4 unpadded sequences per step, each rank taking 2 of
them. Every sequence has the same number of labelled tokens, so the mean loss of the whole batch is the mean of
the two ranks' mean losses, and the ranks' averaged gradients (DDP all-reduce, FSDP2 reduce-scatter, both
averaging) are the single process's gradient: the runs differ by fp32 rounding only (two half-batch sums and a
reduction instead of one sum), which 5 AdamW steps carry into the weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fastft import FastModel, patch
from fastft.distributed.sharding import shard
from fastft.kernels import force_backend
from fastft.rl.heads import causal_log_probs
from tests.distributed.launch import free_port, run_ranks
from tests.rl.tiny import tiny_llama

STEPS, BATCH, SEQ, WORLD = 5, 4, 16, 2
# fp32 weights after 5 AdamW steps (lr 1e-3: every element moves ~1e-3 per step). Measured max |diff| vs one
# process: 9e-8 for LoRA (DDP and every FSDP2 variant), 7.6e-7 for full fine-tuning on 2 threads and 5.0e-6 on one:
# rounding of differently ordered sums, which Adam's division of the gradient by its own magnitude carries into
# the update. The full fine-tuning worst case is an embedding row whose only gradient (8.7e-8, at step 3) is left
# by cancellation and differs by 2% between the two summation orders: Adam turns that into a 2% difference of a
# ~lr update (1e-8 eps is negligible there), kept by its momentum over the next steps. The bounds allow ~10x the
# LoRA figure and 4x the full one, and stay 1000x / 50x below one step's update.
LORA_ATOL, FULL_ATOL = 1e-6, 2e-5


def _batches() -> torch.Tensor:
    return torch.randint(0, 2048, (STEPS, BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def _lora_model(checkpointing: bool | str = False) -> torch.nn.Module:
    # init_lora_weights=False: B starts random, so A and B both get gradients from the first step.
    model = FastModel.get_peft_model(
        tiny_llama(0), r=4, lora_alpha=8, random_state=0, init_lora_weights=False,
        use_gradient_checkpointing=checkpointing,
    )  # fmt: skip
    return model.train()


def _full_model() -> torch.nn.Module:
    return patch(tiny_llama(0)).train()


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _trainable(model: torch.nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    model = getattr(model, "module", model)  # DDP
    return {n: _full(p.grad if grads else p) for n, p in model.named_parameters() if p.requires_grad}


def _train(model: torch.nn.Module, batches: torch.Tensor) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    with force_backend("torch"):
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss  # the fused linear cross-entropy (no logits)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return losses


def _heads(model: torch.nn.Module, ids: torch.Tensor) -> dict:
    """Fused loss, log-probs and entropy of one batch, and the gradients of their sum."""
    with force_backend("torch"):
        loss = model(input_ids=ids, labels=ids).loss
        scored = causal_log_probs(model, ids, entropy=True)
        (loss + scored.log_probs.mean() + scored.entropy.mean()).backward()
    return {"loss": loss.item(), "log_probs": scored.log_probs.detach(), "entropy": scored.entropy.detach(),
            "grads": _trainable(model, grads=True)}  # fmt: skip


def _on_ranks(rank: int, world: int) -> dict:
    batches = _batches()[:, rank * BATCH // world : (rank + 1) * BATCH // world]
    results = {}
    runs = {
        "ddp": lambda: torch.nn.parallel.DistributedDataParallel(_lora_model()),
        "fsdp": lambda: shard(_lora_model()),
        # Layers keep their gathered weights until backward; offloaded checkpointing recomputes them there.
        "fsdp_keep_unsloth": lambda: shard(_lora_model("unsloth"), reshard_after_forward=False),
        "fsdp_cpu_offload": lambda: shard(_lora_model(), cpu_offload=True),
        "fsdp_full": lambda: shard(_full_model()),
    }
    for name, build in runs.items():
        model = build()
        results[name] = {"losses": _train(model, batches), "weights": _trainable(model)}
    results["heads"] = _heads(shard(_lora_model("unsloth")), batches[0])
    results["bf16_losses"] = _train(shard(_lora_model(), mixed_precision=torch.bfloat16), batches)
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_ranks(_on_ranks, WORLD)


@pytest.fixture(scope="module")
def single() -> dict:
    lora, full = _lora_model(), _full_model()
    heads = _heads(_lora_model("unsloth"), _batches()[0])
    return {"lora": (_train(lora, _batches()), _trainable(lora)), "full": (_train(full, _batches()), _trainable(full)),
            "heads": heads}  # fmt: skip


def _assert_weights(got: dict, want: dict, atol: float) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("run", ["ddp", "fsdp", "fsdp_keep_unsloth", "fsdp_cpu_offload", "fsdp_full"])
def test_training_matches_one_process(ranks, single, run):
    losses, weights = single["full" if run == "fsdp_full" else "lora"]
    initial = _trainable(_full_model() if run == "fsdp_full" else _lora_model())
    moved = min((weights[n] - initial[n]).abs().max().item() for n in weights)
    atol = FULL_ATOL if run == "fsdp_full" else LORA_ATOL
    assert moved > 100 * atol  # every trained tensor moved far more than the tolerance
    for rank in ranks:
        _assert_weights(rank[run]["weights"], weights, atol)
    # Each rank's loss is its half-batch mean; their average is the whole batch's mean.
    mean_losses = [(a + b) / 2 for a, b in zip(ranks[0][run]["losses"], ranks[1][run]["losses"], strict=True)]
    assert mean_losses == pytest.approx(losses, abs=1e-5)
    for name in weights:  # ranks identical to each other, bit for bit
        assert torch.equal(ranks[0][run]["weights"][name], ranks[1][run]["weights"][name]), name


def test_fused_loss_and_log_prob_head_under_fsdp2(ranks, single):
    want = single["heads"]
    halves = [rank["heads"] for rank in ranks]
    # Row-wise values: each rank scores its own half of the batch with the gathered weights.
    torch.testing.assert_close(torch.cat([h["log_probs"] for h in halves]), want["log_probs"], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([h["entropy"] for h in halves]), want["entropy"], rtol=0, atol=1e-5)
    assert (halves[0]["loss"] + halves[1]["loss"]) / 2 == pytest.approx(want["loss"], abs=1e-5)
    # Gradients reduced across ranks = the whole batch's. Measured: max |diff| 1.0e-4 of the tensor's largest
    # entry (the entropy's gradient sums 2048 vocabulary terms that largely cancel, in another order per half).
    for rank in halves:
        for name, grad in want["grads"].items():
            scale = grad.abs().max().item()
            torch.testing.assert_close(rank["grads"][name], grad, rtol=0, atol=1e-3 * scale, msg=name)


def test_bf16_mixed_precision_trains_close_to_fp32(ranks, single):
    # bf16 compute (8-bit mantissa) over fp32 master weights and fp32 gradient reduction: losses near the fp32
    # run's, not equal (measured max |diff| 9e-4 over 5 steps; bf16's relative step is 4e-3).
    mean_losses = [(a + b) / 2 for a, b in zip(ranks[0]["bf16_losses"], ranks[1]["bf16_losses"], strict=True)]
    assert mean_losses == pytest.approx(single["lora"][0], abs=1e-2)


# ------------------------------------------------------------------------------------------ errors (one process)


def test_shard_without_process_group_says_how_to_launch():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torchrun.*init_process_group"):
        shard(_lora_model())


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_refuses_wrapped_sharded_meta_and_4bit_models(one_rank_group):
    with pytest.raises(TypeError, match="DistributedDataParallel.*model.module"):
        shard(torch.nn.parallel.DistributedDataParallel(_lora_model()))
    model = shard(_lora_model())
    with pytest.raises(TypeError, match="already sharded.*before sharding"):
        shard(model)
    with pytest.raises(TypeError, match="already sharded"):
        FastModel.get_peft_model(shard(_full_model()))
    with torch.device("meta"):
        meta = tiny_llama(0)
    with pytest.raises(ValueError, match="meta device"):
        shard(meta)
    with pytest.raises(TypeError, match="mixed_precision"):
        shard(_lora_model(), mixed_precision="bf16")


def test_refuses_4bit_base_naming_ddp(one_rank_group, tmp_path):
    import transformers

    tiny_llama(0).save_pretrained(tmp_path)
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    with pytest.raises(NotImplementedError, match="Params4bit.*DistributedDataParallel.*bf16"):
        shard(model)
