"""Sharded checkpoints and exports of an FSDP2 run (2 CPU ranks, gloo), reloaded in one process.

One launch: both ranks train a sharded LoRA model for two steps, save a DCP checkpoint (with the optimizer),
export a PEFT adapter folder and a merged checkpoint, reload the DCP folder into a freshly sharded model, and
return eval-mode logits of a probe batch. The test process then loads each artefact without any process
group and compares logits.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from fastft import FastModel, patch
from fastft.distributed.checkpoint import export, load_sharded, save_sharded
from fastft.distributed.sharding import shard
from fastft.kernels import force_backend
from tests.distributed.launch import run_ranks
from tests.rl.tiny import tiny_llama, tokenizer

WORLD = 2


def _lora_model() -> torch.nn.Module:
    model = FastModel.get_peft_model(
        tiny_llama(0), r=4, lora_alpha=8, random_state=0, init_lora_weights=False, use_gradient_checkpointing=False
    )
    return model.train()


def _probe() -> torch.Tensor:
    return torch.randint(0, 2048, (2, 12), generator=torch.Generator().manual_seed(7))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), force_backend("torch"):
        logits = model(input_ids=_probe()).logits.detach()
    model.train()
    return logits


def _on_ranks(rank: int, world: int, folder: str) -> dict:
    model = shard(_lora_model())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = torch.randint(0, 2048, (2, world, 8), generator=torch.Generator().manual_seed(rank))
    with force_backend("torch"):
        for ids in batches:
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    save_sharded(f"{folder}/dcp", model, optimizer)
    export(model, f"{folder}/lora", tokenizer(), save_method="lora")
    export(model, f"{folder}/merged", save_method="merged_16bit")
    logits = _logits(model)

    restored = shard(_lora_model())
    restored_optimizer = torch.optim.AdamW([p for p in restored.parameters() if p.requires_grad], lr=1e-2)
    load_sharded(f"{folder}/dcp", restored, restored_optimizer)
    moments = [s["exp_avg"].full_tensor() for s in optimizer.state.values()]
    restored_moments = [restored_optimizer.state[p]["exp_avg"].full_tensor() for p in restored_optimizer.param_groups[0]["params"]]  # fmt: skip
    return {"logits": logits, "restored_logits": _logits(restored), "moments": (moments, restored_moments)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[str, list[dict]]:
    folder = str(tmp_path_factory.mktemp("sharded_run"))
    return folder, run_ranks(_on_ranks, WORLD, folder)


def test_ranks_and_dcp_reload_on_ranks_agree(saved):
    _, ranks = saved
    assert torch.equal(ranks[0]["logits"], ranks[1]["logits"])
    for rank in ranks:
        assert torch.equal(rank["restored_logits"], rank["logits"])  # same weights, same sharded computation
        moments, restored = rank["moments"]
        assert len(moments) == len(restored) > 0
        for a, b in zip(moments, restored, strict=True):
            assert torch.equal(a, b)


# One process here (2 threads) against one thread per rank there: the GEMMs could block their sums differently.
# Measured: identical logits (max |diff| 0.0) for the DCP reload and the PEFT adapter run through fastft; the
# merged checkpoint (transformers' own forward) 6.8e-7, logits being O(1). Training moved them by 1.2.
SAME_ATOL, MERGED_ATOL = 1e-6, 1e-5


def _assert_trained_logits(logits: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    assert (want - _logits(_lora_model())).abs().max() > 0.1  # the run changed the model's outputs
    torch.testing.assert_close(logits, want, rtol=0, atol=atol)


def test_dcp_checkpoint_loads_into_an_unsharded_model_in_one_process(saved):
    folder, ranks = saved
    model = _lora_model()
    load_sharded(f"{folder}/dcp", model)  # no process group: DCP reads every shard of every tensor
    _assert_trained_logits(_logits(model), ranks[0]["logits"], SAME_ATOL)


def test_exported_adapter_loads_with_peft(saved):
    import peft

    folder, ranks = saved
    model = peft.PeftModel.from_pretrained(tiny_llama(0), f"{folder}/lora")
    _assert_trained_logits(_logits(patch(model)), ranks[0]["logits"], SAME_ATOL)
    assert transformers.AutoTokenizer.from_pretrained(f"{folder}/lora").vocab_size == tokenizer().vocab_size


def test_exported_merged_checkpoint_loads_with_transformers(saved):
    folder, ranks = saved
    model = transformers.AutoModelForCausalLM.from_pretrained(f"{folder}/merged")
    # W + s B A merged in fp32, then x (W + s B A)^T instead of x W^T + s (x A^T) B^T: one more rounding.
    _assert_trained_logits(_logits(model), ranks[0]["logits"], MERGED_ATOL)


def test_export_rejects_unknown_method():
    with pytest.raises(ValueError, match="save_method='merged_4bit'.*merged_16bit"):
        export(_lora_model(), "/nonexistent", save_method="merged_4bit")
