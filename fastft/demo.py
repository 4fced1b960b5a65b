"""A one-minute tour of fastft's kernels: ``python -m fastft.demo``.

For each kernel, at a small Llama-like shape on the best device present, it prints the largest error of
fastft and of the plain PyTorch formula against a float64 computation, and the bytes autograd keeps for
backward with each (the memory fastft saves). It needs no network and no GPU.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastft import kernels
from fastft.utils.memory import saved_tensor_bytes


@dataclass
class _Case:
    name: str
    inputs: Callable[[torch.device, torch.dtype], tuple[torch.Tensor, ...]]
    fastft: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    frozen: tuple[int, ...] = ()  # positions of inputs that are frozen weights (no gradient)


def _first(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat([o.flatten() for o in out]) if isinstance(out, tuple) else out


def _cases(tokens: int, hidden: int, inter: int, vocab: int, heads: int, kv_heads: int) -> list[_Case]:
    head_dim = hidden // heads

    def norm_inputs(device, dtype):
        return torch.randn(tokens, hidden, device=device, dtype=dtype), 1 + 0.1 * torch.randn(hidden, device=device)

    def mlp_inputs(device, dtype):
        return tuple(torch.randn(tokens, inter, device=device, dtype=dtype) for _ in range(2))

    def rope_inputs(device, dtype):
        q = torch.randn(1, tokens, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
        k = torch.randn(1, tokens, kv_heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
        inv_freq = 1.0 / 500000 ** (torch.arange(0, head_dim, 2, device=device).double() / head_dim)
        angles = torch.arange(tokens, device=device).double()[:, None] * inv_freq[None]
        angles = torch.cat([angles, angles], -1)[None]
        return q, k, angles.cos().to(dtype), angles.sin().to(dtype)

    def loss_inputs(device, dtype):
        labels = torch.randint(0, vocab, (tokens,), device=device)
        labels[: tokens // 4] = -100  # prompt tokens carry no loss
        weight = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dtype)
        return torch.randn(tokens, hidden, device=device, dtype=dtype), weight, labels

    return [
        _Case("rms_norm", norm_inputs, kernels.rms_norm, kernels.rms_norm_reference),
        _Case("rope", rope_inputs, kernels.rope, kernels.rope_reference, frozen=(2, 3)),
        _Case("swiglu", mlp_inputs, kernels.swiglu, kernels.swiglu_reference),
        _Case("geglu (tanh)", mlp_inputs, kernels.geglu, kernels.geglu_reference),
        _Case(
            "fused_linear_cross_entropy",
            loss_inputs,
            kernels.fused_linear_cross_entropy,
            kernels.fused_linear_cross_entropy_reference,
            frozen=(1,),  # LoRA: the lm_head weight is frozen
        ),
    ]


def _measure(case: _Case, device: torch.device, dtype: torch.dtype) -> tuple[float, float, int, int]:
    torch.manual_seed(0)
    raw = case.inputs(device, dtype)

    def leaves(cast: torch.dtype | None) -> list[torch.Tensor]:
        out = []
        for i, t in enumerate(raw):
            t = t.detach()
            if cast is not None and t.is_floating_point():
                t = t.to(cast)
            out.append(t.requires_grad_(t.is_floating_point() and i not in case.frozen))
        return out

    exact = _first(case.reference(*leaves(torch.float64))).double()
    ours_in, ref_in = leaves(None), leaves(None)
    ours_bytes = saved_tensor_bytes(case.fastft, *ours_in)
    ref_bytes = saved_tensor_bytes(case.reference, *ref_in)
    ours = _first(case.fastft(*leaves(None))).double()
    ref = _first(case.reference(*leaves(None))).double()
    return (ours - exact).abs().max().item(), (ref - exact).abs().max().item(), ours_bytes, ref_bytes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastft.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    print(
        f"fastft kernel demo on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
        f"{args.tokens} tokens, {args.dtype}; errors are max |x - float64|, memory is bytes saved for backward"
    )
    header = f"{'kernel':<28}{'fastft err':>12}{'torch err':>12}{'fastft saved':>15}{'torch saved':>15}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    for case in _cases(args.tokens, hidden=512, inter=1408, vocab=32000, heads=8, kv_heads=2):
        ours_err, ref_err, ours_bytes, ref_bytes = _measure(case, device, dtype)
        ratio = ours_bytes / ref_bytes if ref_bytes else float("nan")
        print(
            f"{case.name:<28}{ours_err:>12.2e}{ref_err:>12.2e}{ours_bytes / 2**20:>12.2f} MiB"
            f"{ref_bytes / 2**20:>12.2f} MiB{ratio:>8.3f}"
        )


if __name__ == "__main__":
    main()
