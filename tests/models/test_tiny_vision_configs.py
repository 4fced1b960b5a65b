"""The tiny image-text-to-text models train on their processor-free inputs, and the image reaches the loss."""

import pytest
import torch

from fastft.models.tiny_vision_configs import IMAGE_TOKEN, VISION_TYPES, tiny_vision_model

# Parameters no loss can reach: the pooling head SigLIP builds but Gemma 3 and LFM2-VL never call, and LLaVA's last
# tower layer and final norm (its features are read from the layer before, vision_feature_layer = -2).
_UNUSED = ("vision_tower.head.", "vision_tower.encoder.layers.1.", "vision_tower.post_layernorm.")


@pytest.mark.parametrize("model_type", VISION_TYPES)
def test_tiny_vision_model_trains_on_its_image(model_type):
    model, inputs = tiny_vision_model(model_type)
    model.train()
    loss = model(**inputs).loss
    assert torch.isfinite(loss)
    loss.backward()
    vision = [
        (name, p)
        for name, p in model.named_parameters()
        if any(k in name for k in ("visual", "vision", "multi_modal_projector", "embed_vision", "connector"))
    ]
    assert vision, f"{model_type}: no vision parameters found"
    reached = [name for name, p in vision if p.grad is not None and p.grad.abs().sum() > 0]
    missed = [
        name
        for name, p in vision
        if name not in reached
        and not (model_type in ("gemma3", "lfm2_vl", "llava") and any(u in name for u in _UNUSED))
    ]
    assert not missed, f"{model_type}: the loss does not reach {missed[:4]}"
    labels = inputs["labels"]
    assert (labels[inputs["input_ids"] == IMAGE_TOKEN] == -100).all()
    assert (labels[inputs["attention_mask"] == 0] == -100).all()
