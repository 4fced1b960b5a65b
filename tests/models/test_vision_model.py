"""FastVisionModel: loading, Unsloth's finetune_* flags on every tiny vision family, training equal to plain PEFT,
inference, merged and LoRA saving that plain transformers / PEFT read back, and the errors for text-only models."""

from __future__ import annotations

import copy
import re

import peft
import pytest
import torch
import transformers
from torch import nn

import fastft
from fastft import FastVisionModel
from fastft.bench import vision_assets as va
from fastft.models.tiny_vision_configs import VISION_TYPES, tiny_vision_model
from fastft.models.vision_model import lora_layers
from tests.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FLAGS = {  # (vision, language, attention, mlp)
    "vision attention": (True, False, True, False),
    "vision mlp": (True, False, False, True),
    "language attention": (False, True, True, False),
    "language mlp": (False, True, False, True),
}


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory):
    return va.write_tiny_vlm(tmp_path_factory.mktemp("tiny-llava"))


def _batch(processor, n=2, seed=0):
    examples = va.image_examples(n, seed=seed)
    texts = [processor.apply_chat_template(e["messages"], tokenize=False) for e in examples]
    out = processor(text=texts, images=[e["images"] for e in examples], padding=True, return_tensors="pt",
                    add_special_tokens=False)  # fmt: skip
    out = dict(out)
    out["labels"] = out["input_ids"].masked_fill(out["attention_mask"] == 0, -100)
    return out


def test_from_pretrained_returns_patched_model_and_processor(tiny_vlm_dir):
    model, processor = FastVisionModel.from_pretrained(tiny_vlm_dir, max_seq_length=96)
    assert isinstance(model, transformers.LlavaForConditionalGeneration)
    assert isinstance(processor, transformers.LlavaProcessor)
    assert model.fastft_report.fused_loss and model.fastft_report.attentions == 2
    assert model.max_seq_length == 96 and processor.tokenizer.model_max_length == 96
    assert model.dtype == torch.float32  # CPU default


@pytest.mark.parametrize("model_type", VISION_TYPES)
def test_finetune_flags_choose_layers_by_structure(model_type):
    model, _ = tiny_vision_model(model_type)
    linear = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    groups = {key: set(lora_layers(model, *flags)) for key, flags in FLAGS.items()}
    for key, names in groups.items():
        assert names, f"{model_type}: no {key} layer found"
    assert not set.intersection(*groups.values())
    everything = set(lora_layers(model))
    assert everything == set.union(*groups.values())
    prefix = next(n for n, m in model.named_modules() if m is model.get_decoder())
    assert all(n.startswith(prefix + ".") for key in ("language attention", "language mlp") for n in groups[key])
    assert not any(n.startswith(prefix + ".") for key in ("vision attention", "vision mlp") for n in groups[key])
    # What is left out: the output head, patch embeddings, SigLIP's pooling head (unused), Gemma 4's per-layer
    # input projections of its language model (not attention, not MLP).
    left = linear - everything
    assert all(n == "lm_head" or "patch_embed" in n or ".head." in n or "per_layer" in n for n in left), (
        f"{model_type}: unexpectedly left out {sorted(left)}"
    )


@pytest.mark.parametrize("model_type", ["qwen2_vl", "gemma3", "mllama", "idefics3"])
def test_peft_regex_selects_exactly_the_chosen_layers_and_both_parts_train(model_type):
    model, inputs = tiny_vision_model(model_type)
    chosen = set(lora_layers(model))
    peft_model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False,
                                                use_gradient_checkpointing=False)  # fmt: skip
    regex = peft_model.peft_config["default"].target_modules
    assert isinstance(regex, str) and r"\d+" in regex  # layer numbers generalised
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == chosen
    FastVisionModel.for_training(peft_model)
    peft_model(**inputs).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if "lora_" in n}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)


def test_target_modules_narrows_and_strings_pass_through():
    model = va.tiny_qwen2_vl()
    names = lora_layers(model, target_modules=["q_proj", "qkv"])
    assert {n.rpartition(".")[2] for n in names} == {"q_proj", "qkv"}
    peft_model = FastVisionModel.get_peft_model(copy.deepcopy(model), target_modules=["q_proj", "qkv"], r=2)
    assert {n.rpartition(".")[2] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")} == {"q_proj", "qkv"}
    own = r".*language_model.*\.v_proj"
    peft_model = FastVisionModel.get_peft_model(copy.deepcopy(model), target_modules=own, r=2)
    assert peft_model.peft_config["default"].target_modules == own


def test_lora_step_equals_plain_peft_with_the_same_targets():
    """fastft's patched model + FastVisionModel's adapters against plain transformers + PEFT with the same regex and
    the same adapter values: loss and every LoRA gradient (vision and language) equal to fp32 rounding."""
    processor = va.tiny_qwen2_vl_processor()
    base = va.tiny_qwen2_vl(0, processor)
    plain_base = copy.deepcopy(base)
    ours = FastVisionModel.get_peft_model(base, r=4, lora_alpha=8, init_lora_weights=False, random_state=1,
                                          use_gradient_checkpointing=False)  # fmt: skip
    config = copy.deepcopy(ours.peft_config["default"])
    plain = peft.get_peft_model(plain_base, config)
    plain.load_state_dict(ours.state_dict())
    batch = _batch(processor)
    FastVisionModel.for_training(ours)
    plain.train()
    loss, plain_loss = ours(**batch).loss, plain(**batch).loss
    loss.backward()
    plain_loss.backward()
    # fp32: the fused loss and the kernels sum in another order than PyTorch; 2e-6 relative is a few roundings of
    # values summed over a 64-wide hidden state and a 2052-token vocabulary.
    torch.testing.assert_close(loss, plain_loss, rtol=2e-6, atol=0)
    theirs = dict(plain.named_parameters())
    lora = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert any("visual" in n for n, _ in lora) and any("language_model" in n for n, _ in lora)
    for name, p in lora:
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_inference_and_both_saves_read_back_with_plain_libraries(tiny_vlm_dir, tmp_path):
    model, processor = FastVisionModel.from_pretrained(tiny_vlm_dir, max_seq_length=256)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False,
                                           use_gradient_checkpointing=False)  # fmt: skip
    batch = _batch(processor, n=1)
    batch.pop("labels")
    FastVisionModel.for_training(model, use_gradient_checkpointing="unsloth")  # Unsloth's optional argument
    assert model.training and not model.base_model.model.config.text_config.use_cache
    FastVisionModel.for_inference(model)
    assert model.base_model.model.config.use_cache and model.base_model.model.config.text_config.use_cache
    with torch.no_grad():
        logits = model(**batch).logits
        generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    FastVisionModel.save_pretrained_merged(model, processor, tmp_path / "merged")
    model.save_pretrained_merged(tmp_path / "lora", processor, save_method="lora")
    merged = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    reloaded_processor = transformers.AutoProcessor.from_pretrained(tmp_path / "merged")
    assert reloaded_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    with torch.no_grad():
        # fp32: W + s B A merged against W x + s B (A x) live: reordered sums, 1e-4 on logits of a few units
        torch.testing.assert_close(merged(**batch).logits, logits, rtol=0, atol=1e-4)
        assert torch.equal(merged.generate(**batch, max_new_tokens=4, do_sample=False), generated)
    base = transformers.AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir)
    adapters = peft.PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapters(**batch).logits, logits, rtol=0, atol=1e-5)


def test_text_only_models_are_refused_by_name(tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    with pytest.raises(ValueError, match=re.escape(repr(str(folder))) + ".*text-only 'llama'.*FastModel"):
        FastVisionModel.from_pretrained(folder)
    with pytest.raises(ValueError, match="LlamaForCausalLM is a text-only 'llama'.*FastModel"):
        FastVisionModel.get_peft_model(tiny_model("llama"))


def test_flag_combinations_that_choose_nothing_are_errors():
    model = va.tiny_llava()
    with pytest.raises(ValueError, match="finetune_vision_layers=False and finetune_language_layers=False"):
        FastVisionModel.get_peft_model(model, finetune_vision_layers=False, finetune_language_layers=False)
    with pytest.raises(ValueError, match="finetune_attention_modules=False and finetune_mlp_modules=False"):
        FastVisionModel.get_peft_model(model, finetune_attention_modules=False, finetune_mlp_modules=False)
    with pytest.raises(ValueError, match="no linear layer.*valid last names are"):
        FastVisionModel.get_peft_model(model, target_modules=["not_a_layer"])


def test_exported_from_fastft_and_patch_recognises_user_built_vlms():
    assert fastft.FastVisionModel is FastVisionModel
    model = fastft.patch(va.tiny_qwen2_vl())
    assert model.fastft_report.fused_loss and model.fastft_report.attentions == 2


def test_4bit_base_trains_and_merges_to_a_plain_checkpoint(tiny_vlm_dir, tmp_path):
    """QLoRA on a VLM: both towers' projections load as bitsandbytes NF4, adapters train on both, and the merged
    checkpoint is a plain one (dequantised, no quantization_config)."""
    from fastft.vision import VisionDataCollator

    model, processor = FastVisionModel.from_pretrained(tiny_vlm_dir, max_seq_length=128, load_in_4bit=True)
    assert type(model.model.language_model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert type(model.model.vision_tower.encoder.layers[0].mlp.fc1).__name__ == "Linear4bit"
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False,
                                           use_gradient_checkpointing=False)  # fmt: skip
    batch = VisionDataCollator(model, processor)(va.image_examples(2))
    FastVisionModel.for_training(model)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n and "vision_tower" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    model.save_pretrained_merged(tmp_path / "merged", processor)
    merged = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert getattr(merged.config, "quantization_config", None) is None
    assert type(merged.model.vision_tower.encoder.layers[0].mlp.fc1) is nn.Linear
