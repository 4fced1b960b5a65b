"""Dequantisation of bitsandbytes 4-bit (NF4 / FP4) weights, read straight from the packed bytes.

QLoRA keeps the frozen base weight in bitsandbytes' 4-bit format and dequantises it on the fly, in the
forward pass and again in the backward pass; the full-precision weight is never stored. This file decodes
what ``bitsandbytes.functional.quantize_4bit`` (and ``bitsandbytes.nn.Linear4bit``) produce, without
importing bitsandbytes: the ``quant_state`` is duck-typed.

The format (checked against bitsandbytes 0.50 in ``tests/kernels/test_nf4.py``), for a weight of
``quant_state.shape`` (``(out_features, in_features)`` for a Linear4bit) with ``n`` elements:

- **Elements** are taken in row-major order of the weight, flattened: blocks and bytes ignore rows.
- **Bytes**: ``packed`` holds ``ceil(n / 2)`` bytes (a ``(ceil(n/2), 1)`` uint8 tensor; other
  ``quant_storage`` dtypes hold the same bytes and are reinterpreted). Byte ``i`` holds element ``2i`` in
  its **high** nibble and element ``2i + 1`` in its low nibble; for odd ``n`` the last low nibble is padding.
- **Codes**: a nibble ``q`` indexes the 16-entry fp32 table ``quant_state.code``: NF4's normal quantiles
  (-1, -0.696, ..., 0, ..., 0.723, 1) or FP4's values divided by 12. Only the table differs.
- **Blocks**: element ``j`` belongs to block ``j // blocksize`` (``blocksize`` in 32, 64, ..., 4096);
  there are ``ceil(n / blocksize)`` blocks, the last one possibly partial, each with one scale ``absmax``.
- **Double quantisation** (``compress_statistics=True``, ``quant_state.state2`` set): the per-block
  ``absmax`` is stored as uint8 codes, themselves quantised blockwise with ``state2`` (an fp32 ``absmax``
  per ``state2.blocksize`` = 256 codes and bitsandbytes' 256-entry dynamic ``code`` table) around the
  fp32 ``offset`` (the mean absmax).

The formula, computed in fp32 and rounded once to the output dtype (``quant_state.dtype``)::

    scale[b] = state2.code[absmax[b]] * state2.absmax[b // state2.blocksize] + offset    (nested)
    scale[b] = absmax[b]                                                                 (not nested)
    W[j]     = code[q_j] * scale[j // blocksize]

This is bitsandbytes' own sequence of fp32 operations (its nested scale is a product rounded to fp32, then
the offset added in a separate op), so the result is bit-identical to ``dequantize_4bit``. The Triton
launch turns floating-point contraction off (``enable_fp_fusion=False``): a fused multiply-add would round
the nested scale once instead of twice and differ from bitsandbytes in the last bit.

Traffic. The kernel reads each packed byte once and writes each output once; the scales are one byte per
block (nested; 4 bytes when not nested) plus 4 bytes per 256 blocks, and the two code tables (1,088 bytes)
stay in cache. Per output element, with blocksize 64 and nested statistics::

    0.5 (packed) + 1/64 (absmax codes) + 4/16384 (state2.absmax) + 2 (bf16 out) = 2.516 bytes    (4.516 in fp32)

so the kernel is memory-bound: ~80% of the traffic is the output write.

Layout of the kernel, and why. One program decodes 512 int32 words (2 KB of packed bytes, 4096 outputs)
arranged as ``[blocks, words per block, 8 nibbles]``:

- The packed bytes are read as int32 words, 4 words per thread: one 128-bit load, a warp reading 512
  contiguous bytes. Triton then hands each thread whole words through shared memory (a 16-byte-per-thread
  exchange of the *packed* data, 4-8x smaller than exchanging the outputs).
- A word's 8 nibbles are 8 consecutive outputs: 16 bytes of bf16, one 128-bit store, consecutive lanes
  writing consecutive 16-byte pieces (fp32: two threads per word, one 128-bit store each).
- The code lookup is ``tl.gather`` from the 16-entry table, which Triton places in shared memory: one
  shared load per element, free of bank conflicts (16 entries in 16 banks, equal indices broadcast).
  A 15-way select tree would cost ~15 instructions per element and make the kernel compute-bound.
- The scale is decoded once per (thread, block), not per element: the tile's leading axis *is* the block,
  so the scale broadcasts over the other two. Its loads are 1-byte and 4-byte gathers that hit L1.

Nothing here is differentiable: the base weight is frozen. ``NF4Weight`` wraps (packed, quant_state) in
the small interface that fastft's fused LoRA functions accept as a base weight: ``.shape``, ``.dtype``,
``.device`` and ``.dequantize()``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastft.kernels._dispatch import use_triton
from fastft.kernels._spec import AuditCase, Ptr

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_QUANT_TYPES = ("nf4", "fp4")
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' quantize_4bit accepts these
# Launch heuristics: 512 words (2 KB packed, 4096 outputs) per program, 4 warps: one 128-bit load and four
# (bf16) or eight (fp32) 128-bit stores per thread, 32 registers at the audit shapes (at most 56, fp32 out at
# blocksize 32), so a full SM of warps keeps ~32 KB of loads in flight. A block of 4096 elements is 512
# words: one block per program.
_WORDS_PER_PROGRAM = 512
_NUM_WARPS = 4


# --------------------------------------------------------------------------------------------------------
# Validation of the duck-typed quant_state
# --------------------------------------------------------------------------------------------------------


def _attr(quant_state: object, name: str, hint: str) -> object:
    if not hasattr(quant_state, name):
        raise TypeError(
            f"dequantize_nf4: quant_state has no attribute {name!r} ({hint}); pass the bitsandbytes QuantState "
            "of the weight, e.g. linear4bit.weight.quant_state."
        )
    return getattr(quant_state, name)


def _check_table(owner: str, table: object, size: int, device: torch.device) -> None:
    if not isinstance(table, torch.Tensor) or not table.is_floating_point() or table.numel() != size:
        got = f"{table.dtype} tensor of {table.numel()} entries" if isinstance(table, torch.Tensor) else table
        raise ValueError(f"dequantize_nf4: {owner} must be a floating-point table of {size} entries, got {got}.")
    if table.device != device:
        raise ValueError(
            f"dequantize_nf4: {owner} is on {table.device} but the packed weight is on {device}; "
            "move the state with quant_state.to(packed.device)."
        )


def _packed_bytes(packed: object, quant_state: object) -> tuple[torch.Tensor, int]:
    """Validate (packed, quant_state) as bitsandbytes makes them; return the bytes (flat uint8) and ``n``."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(
            f"dequantize_nf4: packed must be a torch.Tensor (the 4-bit weight), got {type(packed).__name__}"
        )
    shape = _attr(quant_state, "shape", "the shape of the original weight")
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"dequantize_nf4: quant_state.shape must be a tuple of sizes, got {shape!r}")
    quant_type = _attr(quant_state, "quant_type", "'nf4' or 'fp4'")
    if quant_type not in _QUANT_TYPES:
        raise NotImplementedError(
            f"dequantize_nf4: quant_type {quant_type!r} is not supported (only 'nf4' and 'fp4', bitsandbytes' "
            "4-bit types); dequantize it with bitsandbytes.functional.dequantize_4bit instead."
        )
    dtype = _attr(quant_state, "dtype", "the dtype to dequantise to")
    if dtype not in _OUT_DTYPES:
        raise TypeError(f"dequantize_nf4: quant_state.dtype must be float32, bfloat16 or float16, got {dtype}")
    blocksize = _attr(quant_state, "blocksize", "elements per absmax block")
    if blocksize not in _BLOCKSIZES:
        raise ValueError(f"dequantize_nf4: quant_state.blocksize must be one of {_BLOCKSIZES}, got {blocksize!r}")
    n = math.prod(shape)
    if packed.dtype != torch.uint8:
        # bitsandbytes' quant_storage (e.g. bfloat16 for FSDP) keeps the same bytes in another dtype.
        if not packed.is_contiguous():
            raise ValueError(
                f"dequantize_nf4: packed is a non-contiguous {packed.dtype} tensor; its bytes cannot be "
                "reinterpreted as uint8 in place. Pass packed.contiguous()."
            )
        packed = packed.view(torch.uint8)
    data = packed.reshape(-1)
    if data.numel() != (n + 1) // 2:
        raise ValueError(
            f"dequantize_nf4: packed holds {data.numel()} bytes but a {tuple(shape)} weight in 4 bits needs "
            f"{(n + 1) // 2} (two elements per byte). Is this the quantised weight of this quant_state, and "
            "not an already dequantised one?"
        )
    device = data.device
    _check_table("quant_state.code", _attr(quant_state, "code", "the 16-entry 4-bit table"), 16, device)
    absmax = _attr(quant_state, "absmax", "one scale per block")
    state2 = _attr(quant_state, "state2", "None unless the absmax are double-quantised")
    n_blocks = -(-n // blocksize)
    if not isinstance(absmax, torch.Tensor) or absmax.numel() != n_blocks:
        got = f"{absmax.numel()} entries" if isinstance(absmax, torch.Tensor) else type(absmax).__name__
        raise ValueError(
            f"dequantize_nf4: quant_state.absmax must have ceil(n / blocksize) = {n_blocks} entries, got {got}"
        )
    if absmax.device != device:
        raise ValueError(
            f"dequantize_nf4: quant_state.absmax is on {absmax.device} but the packed weight is on {device}; "
            "move the state with quant_state.to(packed.device)."
        )
    if state2 is None:
        if not absmax.is_floating_point():
            raise TypeError(
                f"dequantize_nf4: quant_state.absmax must be floating point (no state2), got {absmax.dtype}"
            )
        return data, n
    if absmax.dtype != torch.uint8:
        raise TypeError(f"dequantize_nf4: nested quant_state.absmax must hold uint8 codes, got {absmax.dtype}")
    blocksize2 = _attr(state2, "blocksize", "absmax codes per state2 block")
    if not isinstance(blocksize2, int) or blocksize2 <= 0:
        raise ValueError(f"dequantize_nf4: quant_state.state2.blocksize must be a positive int, got {blocksize2!r}")
    _check_table("quant_state.state2.code", _attr(state2, "code", "the 256-entry absmax table"), 256, device)
    absmax2 = _attr(state2, "absmax", "one scale per state2 block")
    n_blocks2 = -(-n_blocks // blocksize2)
    if not isinstance(absmax2, torch.Tensor) or not absmax2.is_floating_point() or absmax2.numel() != n_blocks2:
        raise ValueError(f"dequantize_nf4: quant_state.state2.absmax must be {n_blocks2} floating-point scales")
    offset = _attr(quant_state, "offset", "the mean absmax of a nested state")
    if not isinstance(offset, torch.Tensor) or offset.numel() != 1 or offset.device != device:
        raise ValueError(f"dequantize_nf4: quant_state.offset must be a one-element tensor on {device}, got {offset!r}")
    return data, n


def _check_out(out: object, quant_state: object, device: torch.device) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"dequantize_nf4: out must be a torch.Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != tuple(quant_state.shape) or out.dtype not in _OUT_DTYPES:
        raise ValueError(
            f"dequantize_nf4: out must be a float32/bfloat16/float16 tensor of shape {tuple(quant_state.shape)}, "
            f"got {out.dtype} {tuple(out.shape)}"
        )
    if out.device != device or not out.is_contiguous():
        raise ValueError(f"dequantize_nf4: out must be contiguous and on {device}, got a tensor on {out.device}")


# --------------------------------------------------------------------------------------------------------
# Reference (plain torch): the semantics, the test oracle and the CPU path
# --------------------------------------------------------------------------------------------------------


def _block_scales(quant_state: object) -> torch.Tensor:
    """One fp32 scale per block: the absmax, or its double-quantised decoding (mul, then add, as bnb)."""
    absmax = quant_state.absmax.reshape(-1)
    state2 = quant_state.state2
    if state2 is None:
        return absmax.float()
    block2 = torch.arange(absmax.numel(), device=absmax.device) // state2.blocksize
    scaled = state2.code.float()[absmax.long()] * state2.absmax.reshape(-1).float()[block2]
    return scaled + quant_state.offset.float().reshape(())


def _dequantize_torch(data: torch.Tensor, n: int, quant_state: object, dtype: torch.dtype) -> torch.Tensor:
    blocksize = quant_state.blocksize
    n_blocks = -(-n // blocksize)
    nibbles = torch.stack((data >> 4, data & 15), dim=1).reshape(-1)[:n].long()  # high nibble first
    values = quant_state.code.float()[nibbles]
    values = torch.nn.functional.pad(values, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    weight = (values * _block_scales(quant_state)[:, None]).reshape(-1)[:n]
    return weight.to(dtype).reshape(tuple(quant_state.shape))


def dequantize_nf4_reference(packed: torch.Tensor, quant_state: object) -> torch.Tensor:
    """The full-precision weight, in plain PyTorch: ``code[q_j] * scale[j // blocksize]`` in fp32, rounded once.

    ``packed`` is the 4-bit weight as bitsandbytes stores it (``Params4bit.data``: ``ceil(n/2)`` bytes, the
    first element of each pair in the high nibble) and ``quant_state`` its ``QuantState`` (any object with
    the same attributes). Returns a new tensor of ``quant_state.shape`` in ``quant_state.dtype``, equal bit
    for bit to ``bitsandbytes.functional.dequantize_4bit(packed, quant_state)``.
    """
    data, n = _packed_bytes(packed, quant_state)
    return _dequantize_torch(data, n, quant_state, quant_state.dtype)


# --------------------------------------------------------------------------------------------------------
# Triton kernel. Grid: one program per WORDS int32 words of packed data (8 outputs each), as a tile of
# [WORDS / words-per-block blocks, words per block, 8 nibbles]; see the module docstring for the layout.
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _dequantize_nf4_kernel(
    words_ptr,
    code_ptr,
    absmax_ptr,
    code2_ptr,
    absmax2_ptr,
    offset_ptr,
    out_ptr,
    n_elements,
    n_words,
    n_blocks,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    WORDS: tl.constexpr,
):
    WORDS_PER_BLOCK: tl.constexpr = BLOCKSIZE // 8
    BLOCKS: tl.constexpr = WORDS // WORDS_PER_BLOCK
    # int64 before multiplying: block * WORDS_PER_BLOCK * 8 passes 2^31 for weights of over 2^31 elements.
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    words_idx = blocks[:, None] * WORDS_PER_BLOCK + tl.arange(0, WORDS_PER_BLOCK)[None, :]
    # 4 bytes of packed data per word, read with 128-bit loads (the only bulk read of the kernel).
    words = tl.load(words_ptr + words_idx, mask=words_idx < n_words, other=0)

    # Nibble e of a (little-endian) word is element 8 * word + e: byte e // 2, high nibble first, so the
    # shift is 8 * (e // 2) + 4 * (1 - e % 2) = 4 * (e ^ 1). The arithmetic shift of a negative word only
    # fills bits above those that the & 15 keeps.
    nibble = tl.arange(0, 8)
    codes = (words[:, :, None] >> (4 * (nibble ^ 1))[None, None, :]) & 15
    table = tl.load(code_ptr + tl.arange(0, 16))
    values = tl.gather(table, codes.reshape(WORDS * 8), 0).reshape(BLOCKS, WORDS_PER_BLOCK, 8)

    # One scale per block, decoded in fp32 exactly as bitsandbytes does (the launch disables FMA contraction).
    in_range = blocks < n_blocks
    if NESTED:
        absmax_code = tl.load(absmax_ptr + blocks, mask=in_range, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + absmax_code) * tl.load(absmax2_ptr + blocks // BLOCKSIZE2, mask=in_range, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blocks, mask=in_range, other=0.0).to(tl.float32)

    out = values * scale[:, None, None]
    elements = words_idx[:, :, None] * 8 + nibble[None, None, :]
    tl.store(out_ptr + elements, out.to(out_ptr.dtype.element_ty), mask=elements < n_elements)


def _launch_config(blocksize: int) -> tuple[int, int]:
    """(WORDS per program, num_warps); a program always holds whole blocks (blocksize / 8 words each)."""
    return max(_WORDS_PER_PROGRAM, blocksize // 8), _NUM_WARPS


def _as_words(data: torch.Tensor) -> torch.Tensor:
    """The packed bytes as int32 words; a zero-padded copy when their count or alignment forbids a view
    (only for weights with n % 8 != 0, or a packed view at an odd offset: never a real Linear4bit)."""
    if data.numel() % 4 or data.data_ptr() % 4:
        padded = torch.zeros(-(-data.numel() // 4) * 4, dtype=torch.uint8, device=data.device)
        padded[: data.numel()] = data
        data = padded
    return data.view(torch.int32)


def _dequantize_triton(data: torch.Tensor, n: int, quant_state: object, out: torch.Tensor) -> None:
    words = _as_words(data)
    state2 = quant_state.state2
    blocksize = quant_state.blocksize
    absmax = quant_state.absmax.reshape(-1)
    if state2 is None:
        code2 = absmax2 = offset = absmax  # never read: NESTED is a constexpr
        blocksize2 = 1
    else:
        code2, absmax2 = state2.code.float(), state2.absmax.reshape(-1).float()
        offset, blocksize2 = quant_state.offset.float().reshape(1), state2.blocksize
    words_per_program, num_warps = _launch_config(blocksize)
    grid = (triton.cdiv(words.numel(), words_per_program),)
    _dequantize_nf4_kernel[grid](
        words,
        quant_state.code.float().contiguous(),
        absmax,
        code2.contiguous(),
        absmax2.contiguous(),
        offset,
        out,
        n,
        words.numel(),
        absmax.numel(),
        BLOCKSIZE=blocksize,
        BLOCKSIZE2=blocksize2,
        NESTED=state2 is not None,
        WORDS=words_per_program,
        num_warps=num_warps,
        enable_fp_fusion=False,  # round the nested scale's product before adding the offset, as bnb does
    )


def dequantize_nf4(packed: torch.Tensor, quant_state: object, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantise a bitsandbytes 4-bit (NF4 or FP4) weight: bit-identical to ``bnb.functional.dequantize_4bit``.

    ``packed`` is the quantised weight (``Params4bit.data``, any ``quant_storage`` dtype) and
    ``quant_state`` its ``QuantState``, plain or double-quantised (duck-typed: bitsandbytes is not
    imported). Returns a tensor of ``quant_state.shape`` in ``quant_state.dtype``, or fills and returns
    ``out`` (contiguous, that shape, float32/bfloat16/float16: its dtype is the output dtype). CUDA tensors
    run the Triton kernel, CPU tensors :func:`dequantize_nf4_reference` (or the interpreted kernel under
    ``TRITON_INTERPRET=1``). The result carries no autograd history: the base weight is frozen.
    """
    data, n = _packed_bytes(packed, quant_state)
    if out is not None:
        _check_out(out, quant_state, data.device)
    if not use_triton(data):
        with torch.no_grad():
            weight = _dequantize_torch(data, n, quant_state, quant_state.dtype if out is None else out.dtype)
        return weight if out is None else out.copy_(weight)
    if out is None:
        out = torch.empty(tuple(quant_state.shape), dtype=quant_state.dtype, device=data.device)
    if n:
        _dequantize_triton(data, n, quant_state, out)
    return out


class NF4Weight:
    """A frozen bitsandbytes 4-bit weight as fastft's fused LoRA functions take it: ``.shape``, ``.dtype``,
    ``.device`` and ``.dequantize()``.

    Holds ``packed`` (the 4-bit data) and ``quant_state`` by reference and validates them once; every
    :meth:`dequantize` call rebuilds the full weight (``(out_features, in_features)`` in ``quant_state.dtype``)
    with :func:`dequantize_nf4`, which is what lets QLoRA keep only the 4-bit copy alive. Build it after the
    module reached its device: bitsandbytes quantises, and replaces the parameter, when it is moved.
    """

    def __init__(self, packed: torch.Tensor, quant_state: object) -> None:
        _packed_bytes(packed, quant_state)
        if len(quant_state.shape) != 2:
            raise ValueError(
                f"NF4Weight: a linear weight is 2-D (out_features, in_features), got quant_state.shape "
                f"{tuple(quant_state.shape)}; call dequantize_nf4 directly for other shapes."
            )
        self.packed = packed
        self.quant_state = quant_state

    @classmethod
    def from_bnb(cls, param: torch.Tensor) -> NF4Weight:
        """Wrap a ``bitsandbytes.nn.Params4bit`` (e.g. ``linear4bit.weight``; anything with ``.data`` and
        ``.quant_state``) without copying it."""
        quant_state = getattr(param, "quant_state", None)
        if quant_state is None:
            raise ValueError(
                "NF4Weight.from_bnb: the parameter has no quant_state, so it is not quantised (yet): bitsandbytes "
                "quantises a Linear4bit weight when the module is moved to its device, e.g. module.to('cuda')."
            )
        data = param.data if isinstance(param, torch.Tensor) else param
        return cls(data, quant_state)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.quant_state.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_state.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def dequantize(self) -> torch.Tensor:
        """The full weight, a new ``(out_features, in_features)`` tensor in :attr:`dtype` on :attr:`device`."""
        return dequantize_nf4(self.packed, self.quant_state)

    def __repr__(self) -> str:
        nested = "nested" if self.quant_state.state2 is not None else "not nested"
        return (
            f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"quant_type={self.quant_state.quant_type!r}, blocksize={self.quant_state.blocksize}, {nested})"
        )


def audit_cases() -> list[AuditCase]:
    """The kernel at Llama-3-8B's projection shapes: q/o_proj 4096 x 4096 and gate/up_proj 14336 x 4096
    (down_proj has the same number of elements, and the kernel only sees that), bf16 out, blocksize 64;
    nested statistics (QLoRA's default) and, at the larger shape, plain fp32 absmax."""
    blocksize, blocksize2 = 64, 256
    words_per_program, num_warps = _launch_config(blocksize)
    cases = []
    for name, (rows, cols), nested in (
        ("dequantize_nf4_4096x4096_nested", (4096, 4096), True),
        ("dequantize_nf4_14336x4096_nested", (14336, 4096), True),
        ("dequantize_nf4_14336x4096", (14336, 4096), False),
    ):
        n = rows * cols
        n_blocks = n // blocksize
        n_blocks2 = -(-n_blocks // blocksize2)
        constexprs = {
            "BLOCKSIZE": blocksize,
            "BLOCKSIZE2": blocksize2 if nested else 1,
            "NESTED": nested,
            "WORDS": words_per_program,
        }
        scale_bytes = n_blocks + 4 * n_blocks2 + 256 * 4 + 4 if nested else 4 * n_blocks
        cases.append(
            AuditCase(
                name=name,
                kernel=_dequantize_nf4_kernel,
                args={
                    "words_ptr": Ptr("i32"),
                    "code_ptr": Ptr("fp32"),
                    "absmax_ptr": Ptr("u8" if nested else "fp32"),
                    "code2_ptr": Ptr("fp32"),
                    "absmax2_ptr": Ptr("fp32"),
                    "offset_ptr": Ptr("fp32"),
                    "out_ptr": Ptr("bf16"),
                    "n_elements": n,
                    "n_words": n // 8,
                    "n_blocks": n_blocks,
                    **constexprs,
                },
                constexprs=constexprs,
                num_warps=num_warps,
                shape=f"{rows}x{cols} bf16 bs{blocksize}" + (" nested" if nested else ""),
                # read the packed weight, the scales and the 16-entry table once; write the bf16 weight
                min_bytes=n // 2 + scale_bytes + 16 * 4 + 2 * n,
            )
        )
    return cases
