"""Training a fastft model on more than one device through PyTorch's own engines (FSDP2, DDP).

- :func:`shard`: FSDP2 (``fully_shard``) on each decoder layer and the root of a fastft model (LoRA added first).
- :func:`prepare_trainer`: make an HF / TRL trainer train a sharded model as it is (no DDP wrap around it).
- :func:`save_sharded` / :func:`load_sharded` (``torch.distributed.checkpoint``) and :func:`export` (a normal PEFT
  adapter or merged safetensors that one process loads).
- :func:`context_parallel`: split each sequence across ranks (attention over all-gathered K/V), with
  :func:`shard_batch` for the inputs; composes with :func:`shard`.
- :func:`plan`: bytes per rank (parameters, gradients, optimizer state, activations) with and without fastft;
  ``fastft plan --readme`` prints the README table.

DDP needs nothing from fastft: ``torch.nn.parallel.DistributedDataParallel(model)`` on a fastft model (the
fused LoRA Functions' gradients are synchronised like any other; QLoRA runs this way, as 4-bit bases cannot be
sharded).
"""

from fastft.distributed.checkpoint import export, load_sharded, save_sharded
from fastft.distributed.context_parallel import ContextParallel, context_parallel, shard_batch
from fastft.distributed.planner import Dims, Footprint, Plan, dims_of, plan, readme_table
from fastft.distributed.sharding import decoder_layers, shard
from fastft.distributed.trainer import forbid_ddp, prepare_trainer
from fastft.models.zero3 import gathered_head

__all__ = [
    "ContextParallel",
    "Dims",
    "Footprint",
    "Plan",
    "context_parallel",
    "decoder_layers",
    "dims_of",
    "export",
    "forbid_ddp",
    "gathered_head",
    "load_sharded",
    "plan",
    "prepare_trainer",
    "readme_table",
    "save_sharded",
    "shard",
    "shard_batch",
]
