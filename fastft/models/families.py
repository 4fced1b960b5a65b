"""What fastft knows about each model family: one table row per family, not one copied forward per family.

Everything that can be recognised from a model's structure (an RMSNorm-like module, a gated MLP, attention
that calls a rotary function) is recognised and then checked numerically against the module's own forward
(see :mod:`fastft.models.recognize`), so a family that is not in this table is still patched where its
blocks have the known structure. The table holds what structure cannot tell:

- ``norm_offset``: Gemma's RMSNorm multiplies by ``1 + weight``: the probe's first guess (it tries both);
- the causal-LM head is not listed: whether the loss can be computed from the hidden states, and with which
  scale and softcap, is probed on each model's own forward (:func:`fastft.models.recognize.probe_head`);
- ``fused_projections``: names of projections that hold several logical ones (Phi-3's ``qkv_proj`` and
  ``gate_up_proj``), so LoRA ``target_modules`` written for Llama (q/k/v, gate/up) map onto them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    """Per-family facts that structure alone cannot reveal."""

    norm_offset: float = 0.0
    fused_projections: dict[str, tuple[str, ...]] = field(default_factory=dict)


_PHI3_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),
    "qwen3": Family(),
    "gemma": Family(norm_offset=1.0),
    "gemma2": Family(norm_offset=1.0),
    "gemma3_text": Family(norm_offset=1.0),
    "phi3": Family(fused_projections=_PHI3_FUSED),
}

# An architecture not in the table: patched wherever the probes match (the table only orders their guesses).
UNKNOWN = Family()


def family_of(config: object) -> tuple[str, Family]:
    """The model type of a transformers config and its table row (``UNKNOWN`` when it is not listed)."""
    model_type = getattr(config, "model_type", None) or "unknown"
    return model_type, FAMILIES.get(model_type, UNKNOWN)
