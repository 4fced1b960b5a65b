"""Long-context training: the MLP over sequence tiles, and fewer layer inputs kept in host memory.

:func:`set_long_context` switches a patched model (plain transformers or PEFT-wrapped, after :func:`fastft.patch`)
to the memory layout long sequences need:

- **tiled MLP** (``tiled_mlp``): every fused gated MLP runs :func:`fastft.kernels.tiled_mlp.tiled_lora_mlp`, so no
  ``(tokens x intermediate)`` tensor exists for the whole sequence, in forward or in backward; gate and up are
  recomputed per tile in backward (a third of the MLP's forward FLOPs). ``True`` picks the tile from free memory,
  an int is the rows per tile. The same losses and gradients up to fp32 rounding of the per-tile partial sums of
  the parameter gradients.
"""

from __future__ import annotations

from torch import nn

from fastft.models.layers import FastGatedMLP

_TILE_ATTR = "_fastft_mlp_tile"


def set_long_context(model: nn.Module, tiled_mlp: bool | int = True) -> dict[str, int]:
    """Switch ``model``'s fused MLPs to sequence tiles (module docstring); returns ``{"tiled_mlp": count}``.

    ``tiled_mlp``: ``True`` (tile rows from free memory), a positive int (rows per tile) or ``False`` (untiled,
    back to :func:`fastft.kernels.lora.lora_mlp`). The model must have been patched (:func:`fastft.patch` or
    ``FastModel``): the MLPs fastft left on transformers' code are not tiled and not counted. Calling it again
    replaces the setting.
    """
    if isinstance(tiled_mlp, bool):
        tile = 0 if tiled_mlp else None
    elif isinstance(tiled_mlp, int) and tiled_mlp > 0:
        tile = tiled_mlp
    else:
        raise ValueError(
            f"set_long_context: tiled_mlp must be True (tile from free memory), False or a positive number of rows "
            f"per tile, got {tiled_mlp!r}."
        )
    mlps = [m for m in model.modules() if isinstance(m, FastGatedMLP)]
    if tile is not None and not mlps:
        raise ValueError(
            f"set_long_context(tiled_mlp={tiled_mlp!r}) found no fused gated MLP in {type(model).__name__}: patch the "
            "model first (fastft.patch(model) or FastModel.from_pretrained), or pass tiled_mlp=False."
        )
    for mlp in mlps:
        if tile is None:
            mlp.__dict__.pop(_TILE_ATTR, None)
        else:
            mlp.__dict__[_TILE_ATTR] = tile
    return {"tiled_mlp": len(mlps) if tile is not None else 0}
