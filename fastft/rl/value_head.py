"""PPO's critic: a linear value head on the policy's own backbone hidden states (one forward, two heads).

``V(s_t) = h_t . w + b`` in fp32, where h_t is the backbone's last hidden state that also predicts token t.
Sharing the backbone halves the forward passes of a separate critic model; the head adds hidden_size + 1
parameters. It is saved next to the policy as ``value_head.safetensors`` (tensors ``weight`` (1, H), ``bias`` (1,)).
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """A ``Linear(hidden_size, 1)`` in fp32, initialised to zero (every value starts at 0, for any seed).

    ``forward(hidden (..., H)) -> (...)`` upcasts the hidden states and runs outside autocast, so values and
    their regression targets stay fp32 under bf16/fp16 mixed precision.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.summary.weight
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.summary(hidden.to(device=weight.device, dtype=weight.dtype)).squeeze(-1)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write ``value_head.safetensors`` into ``directory``; returns the file's path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, VALUE_HEAD_FILE)
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.summary.state_dict().items()}
        save_file(tensors, path, metadata={"format": "pt"})
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ValueHead:
        """The value head saved by :meth:`save_pretrained` (or ``PPOTrainer.save_model``) in ``directory``."""
        path = os.path.join(directory, VALUE_HEAD_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {VALUE_HEAD_FILE} in {os.fspath(directory)!r}: save one with save_pretrained")
        tensors = load_file(path)
        head = cls(tensors["weight"].shape[1])
        head.summary.load_state_dict(tensors)
        return head
