"""Context parallelism (fastft.distributed.context_parallel) on 2 CPU ranks (gloo) against one process.

One launch runs every distributed case on both ranks; the single-process references run in the test process on
the whole sequence. Each case is one training step (forward with the loss, backward, gradient sum over the ranks)
on a batch of 2 rows of 13 tokens (not divisible by 2: shard_batch pads one ignored token at the end, so rank 0
holds positions 0-6 and rank 1 positions 7-13), the first row with its 4 first labels ignored (and once with the
second row padded at the end, against transformers with the padding mask). With load_balance=True (head-tail) the
row is padded to 16, 4 chunks of 4: rank 0 holds positions 0-3 and 12-15, rank 1 positions 4-11. Compared: the sum
of the ranks' losses with the single-process loss, and every trainable gradient.

Tolerance: fp32 models, 1e-5 of the largest value of each compared tensor (the repository's fp32 contract, as in
tests/models/test_long_context.py). The runs differ by fp32 rounding only: each rank's loss sums its own tokens'
terms (divided by the global count) and the ranks' gradients are summed by a collective, instead of one sum over
the sequence; attention sums over the same keys in another blocking. Measured: at most 3e-6 of the largest value.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers

import fastft
from fastft.distributed import context_parallel as cp_module
from fastft.distributed import shard
from fastft.distributed.context_parallel import context_parallel, context_parallel_attention, shard_batch
from fastft.kernels import force_backend
from fastft.models.checkpointing import set_checkpointing
from fastft.models.families import FAMILIES
from fastft.models.long_context import set_long_context
from fastft.models.tiny_vision_configs import tiny_vision_config
from tests.distributed.launch import free_port, run_ranks
from tests.models.tiny import tiny_model, twins

ROOT = Path(__file__).resolve().parents[2]
WORLD, TOKENS = 2, 13
FP32 = 1e-5

# name -> (family, config overrides, fastft-patched, LoRA). Mistral and Gemma-3 get a window of 4 tokens, shorter
# than the sequence, so the sliding-window band mask is exercised on both ranks.
MODELS = {
    "lora": ("llama", {}, True, True),
    "plain": ("llama", {}, False, True),  # transformers + PEFT as they are: the attention function alone
    "full": ("llama", {}, True, False),
    "qwen2": ("qwen2", {}, True, True),
    "qwen3": ("qwen3", {}, True, True),
    "mistral": ("mistral", {"sliding_window": 4}, True, True),
    "gemma": ("gemma", {}, True, True),
    "gemma3_text": ("gemma3_text", {"sliding_window": 4}, True, True),
    "phi3": ("phi3", {}, True, True),  # fused qkv / gate_up projections, partial rotary
}
# Every family of fastft.models.families but Gemma-2, whose attention-logit softcap is refused (tested below).
# Distributed variants of the "lora" model, all compared with its single-process step.
VARIANTS = (
    "fallback_allgather", "right_padded", "triton", "balanced", "balanced_mistral", "fsdp",
    "fsdp_balanced_offload_tiled",
)  # fmt: skip
OWN_REFERENCE = ("right_padded", "triton")  # variants compared with their own single-process step


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, 128, (2, TOKENS), generator=gen)
    labels = input_ids.clone()
    labels[0, :4] = -100
    return {"input_ids": input_ids, "labels": labels}


def _right_padded_batch() -> dict[str, torch.Tensor]:
    """The batch with its second row padded at the end (3 tokens, labels -100 there), as SFT collators pad."""
    batch = _batch()
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][1, 10:] = 0
    batch["input_ids"][1, 10:] = 0
    batch["labels"][1, 10:] = -100
    return batch


def _model(name: str) -> torch.nn.Module:
    family, overrides, fast, lora = MODELS[name]
    model, _ = twins(family, torch.float32, lora=lora, model_kwargs=overrides)
    if fast:
        fastft.patch(model)
    return model.train()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            out[name] = grad.detach().clone()
    return out


def _step(model: torch.nn.Module, inputs: dict, backend: str = "torch") -> torch.Tensor:
    with force_backend(backend):
        loss = model(**inputs).loss
        loss.backward()
    return loss.detach()


def _cp_step(
    model: torch.nn.Module, backend: str = "torch", batch: dict | None = None, load_balance: bool = False
) -> dict:
    cp = context_parallel(model, load_balance=load_balance)
    loss = _step(model, cp.shard_batch(batch or _batch()), backend)
    cp.sync_gradients()
    return {"loss": cp.reduce_loss(loss), "grads": _grads(model)}


def _held(rank: int, world: int, tokens: int, balanced: bool) -> torch.Tensor:
    """The global positions a rank holds: its contiguous shard, or chunks r and 2C-1-r of 2C (head-tail)."""
    chunks = 2 * world if balanced else world
    width = tokens // chunks
    parts = [rank, chunks - 1 - rank] if balanced else [rank]
    return torch.cat([torch.arange(p * width, (p + 1) * width) for p in parts])


def _attention(rank: int, world: int) -> dict:
    """The attention function alone on random GQA inputs (4 query heads, 2 K/V heads, V narrower than Q/K):
    outputs and the gradients of a weighted sum, for plain causal and two sliding windows, in both layouts."""
    model = tiny_model("llama")
    module = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 4, 12, 8, generator=gen), torch.randn(2, 2, 12, 8, generator=gen)
    v, weight = torch.randn(2, 2, 12, 5, generator=gen), torch.randn(2, 12, 4, 5, generator=gen)
    results = {}
    for balanced in (False, True):
        context_parallel(model, load_balance=balanced)
        held = _held(rank, world, 12, balanced)
        for window in (None, 3, 8):
            local = [t[:, :, held].clone().requires_grad_() for t in (q, k, v)]
            out, _ = context_parallel_attention(module, *local, None, scaling=0.3, sliding_window=window)
            (out * weight[:, held]).sum().backward()
            results[balanced, window] = (out.detach(), *(t.grad for t in local))
    return results


def _on_ranks(rank: int, world: int) -> dict:
    results = {"attention": _attention(rank, world), "inputs": shard_batch(_batch(), pad_token_id=9)}
    results["inputs_balanced"] = shard_batch(_batch(), pad_token_id=9, load_balance=True)
    for name in MODELS:
        results[name] = _cp_step(_model(name))
    cp_module._FORCE_FALLBACK = True  # the public-collective Function instead of torch's own all-gather op
    try:
        results["fallback_allgather"] = _cp_step(_model("lora"))
    finally:
        cp_module._FORCE_FALLBACK = False
    results["right_padded"] = _cp_step(_model("lora"), batch=_right_padded_batch())
    results["triton"] = _cp_step(_model("lora"), "triton")  # fastft's Triton kernels (interpreted) on the shards
    results["balanced"] = _cp_step(_model("lora"), load_balance=True)
    if rank == 0:  # inputs split contiguously for a head-tail model: caught before any collective (rank 1's shard
        model = _model("lora")  # looks the same in both layouts, so only rank 0 runs this)
        context_parallel(model, load_balance=True)
        ids = _batch()["input_ids"][:, :12]  # 6 contiguous positions per rank: rank 0 jumps by 3, not 3 x 3
        try:
            _step(model, shard_batch({"input_ids": ids, "labels": ids}))
        except ValueError as err:
            results["layout_mismatch"] = str(err)
    results["balanced_mistral"] = _cp_step(_model("mistral"), load_balance=True)  # the window on two chunks
    results["fsdp"] = _cp_step(shard(_model("lora")))
    long = _model("lora")
    set_checkpointing(long, "offload")  # the recompute in backward gathers K/V again, in the same order everywhere
    set_long_context(long, tiled_mlp=3)
    results["fsdp_balanced_offload_tiled"] = _cp_step(shard(long), load_balance=True)
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_ranks(_on_ranks, WORLD)


@pytest.fixture(scope="module")
def single() -> dict:
    out = {}
    for name in MODELS:
        model = _model(name)
        loss = _step(model, _batch())
        out[name] = {"loss": loss, "grads": _grads(model)}
    model = _model("lora")
    out["triton"] = {"loss": _step(model, _batch(), "triton"), "grads": _grads(model)}
    model = _model("lora")  # transformers masks the padding; context parallelism drops the mask
    out["right_padded"] = {"loss": _step(model, _right_padded_batch()), "grads": _grads(model)}
    return out


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = (got - want).abs().max().item()
    assert err <= FP32 * want.abs().max().item(), (what, err)


@pytest.mark.parametrize("case", [*MODELS, *VARIANTS])
def test_two_rank_step_equals_one_process(ranks, single, case):
    reference = "mistral" if case == "balanced_mistral" else "lora"
    want = single[case if case in MODELS or case in OWN_REFERENCE else reference]
    assert len(want["grads"]) > 0
    if case == "full":
        assert any("embed_tokens" in n for n in want["grads"])  # every parameter, not adapters only
    for rank in ranks:
        got = rank[case]
        _assert_close(got["loss"], want["loss"], f"{case} loss")
        assert got["grads"].keys() == want["grads"].keys()
        for name, grad in want["grads"].items():
            assert grad.abs().max() > 0, name
            _assert_close(got["grads"][name], grad, f"{case} {name}")


def test_every_family_is_run_or_refused():
    assert {family for family, *_ in MODELS.values()} | {"gemma2"} == set(FAMILIES)


def test_shard_batch_shifts_globally_then_splits_and_pads(ranks):
    batch = _batch()
    ids, labels = batch["input_ids"], batch["labels"]
    shifted = torch.cat([labels[:, 1:], torch.full((2, 2), -100)], dim=1)  # shifted, then padded to 14
    parts = [rank["inputs"] for rank in ranks]
    assert torch.equal(parts[0]["input_ids"], ids[:, :7])
    assert torch.equal(parts[1]["input_ids"], torch.cat([ids[:, 7:], torch.full((2, 1), 9)], dim=1))
    for r, part in enumerate(parts):
        assert torch.equal(part["position_ids"], torch.arange(7 * r, 7 * r + 7).expand(2, -1))
        assert torch.equal(part["shift_labels"], shifted[:, 7 * r : 7 * r + 7])
        assert part["labels"] is not None and part["use_cache"] is False
        # Rank 0's last label is rank 1's first token: the shift happened before the split.
        assert part["num_items_in_batch"].item() == (labels[:, 1:] != -100).sum().item() == 21
    assert torch.equal(parts[0]["shift_labels"][:, -1], ids[:, 7])


def test_inputs_of_the_other_layout_are_caught(ranks):
    assert "not the head-tail layout" in ranks[0]["layout_mismatch"]
    assert "ContextParallel's own shard_batch" in ranks[0]["layout_mismatch"]


def test_shard_batch_head_tail_layout(ranks):
    batch = _batch()
    ids = torch.cat([batch["input_ids"], torch.full((2, 3), 9)], dim=1)  # 13 tokens padded to 16: 4 chunks of 4
    shifted = torch.cat([batch["labels"][:, 1:], torch.full((2, 4), -100)], dim=1)
    for r, rank in enumerate(ranks):
        part, held = rank["inputs_balanced"], _held(r, WORLD, 16, True)  # rank 0: 0-3 and 12-15; rank 1: 4-11
        assert torch.equal(part["input_ids"], ids[:, held])
        assert torch.equal(part["position_ids"], held.expand(2, -1))
        assert torch.equal(part["shift_labels"], shifted[:, held])
        assert torch.equal(part["attention_mask"], torch.ones(2, 8, dtype=torch.long))
    assert torch.equal(_held(0, WORLD, 16, True), torch.tensor([0, 1, 2, 3, 12, 13, 14, 15]))


def _reference_attention(window: int | None) -> tuple[torch.Tensor, ...]:
    """float64 eager attention over the whole sequence, and the gradients of the same weighted sum."""
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 4, 12, 8, generator=gen), torch.randn(2, 2, 12, 8, generator=gen)
    v, weight = torch.randn(2, 2, 12, 5, generator=gen), torch.randn(2, 12, 4, 5, generator=gen)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    allowed = (j <= i) & ((j > i - window) if window is not None else True)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = (probs @ v.repeat_interleave(2, dim=1)).transpose(1, 2)
    (out * weight.double()).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("window", [None, 3, 8])
def test_attention_function_equals_whole_sequence(ranks, window, balanced):
    want = _reference_attention(window)
    for i, (what, full) in enumerate(zip(("out", "dq", "dk", "dv"), want, strict=True)):
        got = torch.full_like(full, float("nan"))
        dim = 1 if i == 0 else 2  # outputs are [batch, tokens, heads, dim]; q/k/v gradients [batch, heads, tokens, dim]
        for r, rank in enumerate(ranks):
            got.index_copy_(dim, _held(r, WORLD, 12, balanced), rank["attention"][balanced, window][i].double())
        _assert_close(got, full, f"window {window} balanced {balanced} {what}")


# ------------------------------------------------------------------------------------------ errors (one process)


def test_without_process_group_says_how_to_launch():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torchrun.*init_process_group"):
        context_parallel(_model("lora"))
    with pytest.raises(RuntimeError, match="torchrun.*init_process_group"):
        shard_batch(_batch())


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_refuses_what_it_cannot_split(one_rank_group):
    ids = _batch()["input_ids"]
    padded = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    padded["attention_mask"][1, :3] = 0
    with pytest.raises(ValueError, match="zeros before ones.*padding_side='right'"):
        shard_batch(padded)  # left padding
    right = _right_padded_batch()
    right["labels"][1, 11] = 5
    with pytest.raises(ValueError, match="padding positions.*labels other than -100"):
        shard_batch(right)
    packed = torch.cat([torch.arange(7), torch.arange(6)]).expand(2, -1)
    with pytest.raises(ValueError, match="packed.*own row"):
        shard_batch({"input_ids": ids, "position_ids": packed})
    with pytest.raises(TypeError, match="pixel_values"):
        shard_batch({"input_ids": ids, "pixel_values": torch.zeros(1)})
    with pytest.raises(ValueError, match="input_ids of shape"):
        shard_batch({"input_ids": ids[0]})
    gemma2, _ = twins("gemma2", torch.float32)
    with pytest.raises(NotImplementedError, match="attn_logit_softcapping"):
        context_parallel(gemma2)
    vision = transformers.Qwen2VLForConditionalGeneration(tiny_vision_config("qwen2_vl"))
    with pytest.raises(NotImplementedError, match="composite \\(multimodal\\)"):
        context_parallel(vision)

    model = _model("lora")
    cp = context_parallel(model)
    with pytest.raises(ValueError, match="attention_mask with zeros.*shard_batch"):  # handed to the model directly
        model(input_ids=ids, attention_mask=padded["attention_mask"])
    with pytest.raises(ValueError, match="KV cache"), torch.no_grad():  # the first decoding step
        model.eval().generate(ids[:, :5], max_new_tokens=2, do_sample=False)
    cp = context_parallel(model)  # a second call (another group, say) still goes back to the first implementation
    cp.close()  # back to eager: generation works again
    assert model.config._attn_implementation == "eager"
    assert model.generate(ids[:, :5], max_new_tokens=2, do_sample=False).shape == (2, 7)

    other = _model("lora")
    other.config._attn_implementation = "fastft_cp"  # the name without context_parallel(): no group
    with pytest.raises(RuntimeError, match="was not set up"):
        other(**{k: v for k, v in _batch().items() if k != "labels"})


def test_shard_after_context_parallel_is_caught(one_rank_group):
    model = _model("lora")
    cp = context_parallel(model)
    model = shard(model)
    _step(model, cp.shard_batch(_batch()))
    with pytest.raises(RuntimeError, match="Call shard\\(model\\) first"):
        cp.sync_gradients()


def _run_example(*launcher: str, tmp_path: Path, options: tuple[str, ...] = ()) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1",
           "MASTER_PORT": str(free_port())}  # fmt: skip
    env.pop("TRITON_INTERPRET", None)  # fastft's torch path on CPU, as a user's run
    command = [sys.executable, *launcher, str(ROOT / "examples/distributed/long_context.py"), "--tokens", "256",
               "--steps", "2", *options]  # fmt: skip
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return [float(x) for x in re.findall(r"step \d+  loss ([\d.]+)", done.stdout)]


def test_documented_launch_matches_one_process(tmp_path):
    """``torchrun --nproc_per_node 2 examples/distributed/long_context.py --shard --load-balance`` against ``python``
    on it: both ranks print the one-process losses (5 decimals; measured equal)."""
    one = _run_example(tmp_path=tmp_path)
    two = _run_example("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                       tmp_path=tmp_path, options=("--shard", "--load-balance"))  # fmt: skip
    assert len(one) == 2 and len(two) == 4  # 2 steps; 2 ranks
    assert two[0::2] == pytest.approx(one, abs=2e-5) and two[1::2] == pytest.approx(one, abs=2e-5)
