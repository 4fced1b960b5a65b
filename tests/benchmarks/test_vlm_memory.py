"""fastft.bench.vlm: what one vision-language LoRA step (an image and text) saves for backward, fastft vs plain.

Qwen2.5-VL-7B's proportions scaled down (every width / 4, 2 decoder layers and 2 vision blocks, vocabulary 32000),
bf16, one image of 256 visual tokens (1024 patches through the tower) in 256 text tokens, LoRA r=16 on the vision
tower, the projector and the language model. fastft runs its torch path (the same tensors saved as its Triton
kernels; the test session interprets Triton). The table behind these numbers: ``python -m fastft.bench.vlm``.
"""

from __future__ import annotations

import pytest

from fastft.bench import vlm
from fastft.kernels._dispatch import force_backend

DIMS = vlm.QWEN25_VL_SCALED
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def measured() -> dict[str, vlm.SavedResult]:
    with force_backend("torch"):
        return {name: vlm.measure_saved(name, DIMS) for name in vlm.CONTENDERS}


def test_the_same_step_runs_for_every_contender(measured):
    losses = [r.loss for r in measured.values()]
    # bf16: the contenders round in different places; 1e-3 relative is a few bf16 roundings of a loss of ~10.4
    assert max(losses) - min(losses) < 1e-3 * losses[0], losses


def test_fastft_saves_at_most_35_percent_of_plain(measured):
    """fastft's kernels in the vision tower and the language model, and its fused loss, keep at most 0.35x of what
    plain transformers + PEFT keeps for backward (measured: 0.30); FastVisionModel's default, offloaded
    checkpointing of every decoder layer and vision block, at most 0.08x on the device (measured: 0.04)."""
    plain, offload, fastft = (measured[n] for n in ("plain", "fastft+offload", "fastft"))
    table = vlm.saved_table(list(measured.values()))
    assert fastft.saved_bytes <= 0.35 * plain.saved_bytes, table
    assert offload.saved_bytes <= 0.08 * plain.saved_bytes, table


def test_no_logits_tensor_is_saved_by_fastft(measured):
    """Plain saves the fp32 (tokens x vocabulary) logits for its loss; fastft's fused loss saves nothing that size."""
    tokens_x_vocab = DIMS.seq_len * DIMS.vocab

    def largest(result):
        return max(bytes_ // count for _, count, bytes_ in result.tensors)

    assert any(name.startswith("float32") and f"{DIMS.vocab})" in name for name, _, _ in measured["plain"].tensors)
    for name in ("fastft", "fastft+offload"):
        assert largest(measured[name]) < tokens_x_vocab, vlm.saved_table([measured[name]])
        assert not any(f"{DIMS.vocab})" in n for n, _, _ in measured[name].tensors)


def test_sample_marks_the_image_and_prompt_as_ignored():
    batch = vlm.sample(vlm.TINY)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    image = ids == vlm.TINY.vocab - 1
    assert int(image.sum()) == vlm.TINY.image_tokens and ids.numel() == vlm.TINY.seq_len
    assert (labels[image] == -100).all() and (labels[:16] == -100).all() and (labels[-8:] != -100).all()
    assert batch["pixel_values"].shape == (4 * vlm.TINY.image_tokens, 3 * 2 * 14 * 14)
    with pytest.raises(ValueError, match="image_tokens=15 is not a square number"):
        vlm.sample(vlm.VlmDims(image_tokens=15))
