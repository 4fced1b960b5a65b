"""fastft's RL and preference-training layer: log-prob heads from hidden states, TRL integration, trainers."""

from fastft.rl.heads import backbone_hidden_states, causal_log_probs, head_log_probs, head_transform

__all__ = ["backbone_hidden_states", "causal_log_probs", "head_log_probs", "head_transform"]
