"""fastft's RL and preference-training layer over TRL.

- :mod:`fastft.rl.heads`: per-token log-probs of a causal LM from its hidden states (no full logits).
- :mod:`fastft.rl.trl_integration`: TRL's own SFT/DPO/KTO/GRPO/RLOO trainers use fastft's head for fastft models.
- Trainers: :class:`PPOTrainer` + :class:`PPOConfig` (PPO with a value head, which TRL no longer has), and
  :class:`ORPOTrainer` / :class:`CPOTrainer` (TRL's ``trl.experimental`` objectives without full logits), with
  their configs. They need TRL and are imported on first use, so ``import fastft.rl`` works without it.
"""

from __future__ import annotations

import importlib

from fastft.rl.heads import backbone_hidden_states, causal_log_probs, head_log_probs, head_transform, run_in_root

_TRAINERS = {
    "PPOTrainer": "fastft.rl.ppo_trainer",
    "PPOConfig": "fastft.rl.ppo_config",
    "ValueHead": "fastft.rl.value_head",
    "ORPOTrainer": "fastft.rl.orpo",
    "ORPOConfig": "fastft.rl.orpo",
    "CPOTrainer": "fastft.rl.cpo",
    "CPOConfig": "fastft.rl.cpo",
}

__all__ = [
    "CPOConfig",
    "CPOTrainer",
    "ORPOConfig",
    "ORPOTrainer",
    "PPOConfig",
    "PPOTrainer",
    "ValueHead",
    "backbone_hidden_states",
    "causal_log_probs",
    "head_log_probs",
    "head_transform",
    "run_in_root",
]


def __getattr__(name: str):
    module = _TRAINERS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastft.rl' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
