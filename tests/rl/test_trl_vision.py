"""Unmodified TRL trainers on images: a fastft vision model (FastVisionModel's LoRA on vision and language layers)
against plain transformers + PEFT with the same adapters, per step.

- ``SFTTrainer`` with TRL's own VLM collation (no collator given) and with :class:`fastft.vision.VisionDataCollator`
  (responses only): loss, entropy, token accuracy and gradient norm per step;
- ``GRPOTrainer`` with image prompts and a reward function: per-step loss, reward and KL (the reference pass is the
  same model with the adapters off), and the per-token log-probs of one batch scored by both models.

The settings and the tolerance are those of ``tests/rl/test_trl_trainers.py`` (SGD, so fp32 summation-order
differences of ~1e-6 per op stay linear: 2e-4 relative per logged value). Every fastft run routes TRL's fused
log-prob head through fastft's kernel (counted), every plain run through TRL's own.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset

from fastft import FastVisionModel
from fastft.bench import vision_assets as va
from fastft.kernels import force_backend
from fastft.rl import trl_integration
from fastft.vision import VisionDataCollator

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RTOL, ATOL = 2e-4, 1e-5
STEPS = 3


@pytest.fixture(autouse=True)
def _torch_path():
    """The kernels' torch path (the Triton kernels are checked against it in tests/kernels)."""
    with force_backend("torch"):
        yield


def _common(tmp_path, **overrides) -> dict:
    settings = {
        "output_dir": str(tmp_path), "max_steps": STEPS, "per_device_train_batch_size": 4, "learning_rate": 0.05,
        "optim": "sgd", "bf16": False, "report_to": "none", "use_cpu": True, "save_strategy": "no", "logging_steps": 1,
        "disable_tqdm": True, "seed": 0, "dataloader_num_workers": 0,
    }  # fmt: skip
    settings.update(overrides)
    return settings


def _twins():
    """(plain, fast, processor): tiny Qwen2-VL twins with the same random LoRA adapters on vision and language
    layers; fast is FastVisionModel's (patched), plain is PEFT's with the same target regex."""
    processor = va.tiny_qwen2_vl_processor()
    base = va.tiny_qwen2_vl(0, processor)
    plain_base = copy.deepcopy(base)
    fast = FastVisionModel.get_peft_model(base, r=4, lora_alpha=8, init_lora_weights=False,
                                          use_gradient_checkpointing=False)  # fmt: skip
    plain = peft.get_peft_model(plain_base, copy.deepcopy(fast.peft_config["default"]))
    plain.load_state_dict(fast.state_dict())
    return plain, fast, processor


def _run(make_trainer, model, expect_route: str) -> list[dict]:
    before = dict(trl_integration.calls)
    torch.manual_seed(0)
    trainer = make_trainer(model)
    trainer.train()
    routed = {k: trl_integration.calls[k] - before.get(k, 0) for k in ("fastft", "trl")}
    other = "trl" if expect_route == "fastft" else "fastft"
    assert routed[expect_route] > 0 and routed[other] == 0, routed
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


def _compare(plain_history, fast_history, keys) -> None:
    assert len(plain_history) == len(fast_history) == STEPS
    for key in keys:  # GRPO logs rewards only on the steps that generate
        assert any(key in p for p in plain_history), key
    for step, (p, f) in enumerate(zip(plain_history, fast_history)):
        for key in keys:
            assert (key in p) == (key in f), (step, key)
            if key in p:
                assert f[key] == pytest.approx(p[key], rel=RTOL, abs=ATOL), (step, key, p[key], f[key])


@pytest.mark.parametrize("collator", ["trl", "fastft"])
def test_sft_with_images_equals_plain_per_step(tmp_path, collator):
    plain, fast, processor = _twins()
    dataset = Dataset.from_list(va.image_examples(12, seed=1))

    def make(model):
        if collator == "trl":
            args = trl.SFTConfig(**_common(tmp_path, max_length=None))
            return trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
        args = trl.SFTConfig(**_common(tmp_path, max_length=None, remove_unused_columns=False,
                                       dataset_kwargs={"skip_prepare_dataset": True}))  # fmt: skip
        data_collator = VisionDataCollator(model, processor, train_on_responses_only=True)
        return trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                              data_collator=data_collator)  # fmt: skip

    p, f = _run(make, plain, "trl"), _run(make, fast, "fastft")
    _compare(p, f, ["loss", "entropy", "mean_token_accuracy", "grad_norm"])
    assert f[-1]["loss"] < f[0]["loss"]


def _vowel_reward(completions, **kwargs) -> list[float]:
    """A deterministic toy reward with spread on a random model's text: the share of vowels in the completion."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch in "aeiou" for ch in text) / max(len(text), 1) for text in texts]


def _image_prompts(n: int) -> list[dict]:
    rows = []
    for example in va.image_examples(n, seed=2):
        rows.append({"prompt": example["messages"][:1], "image": example["images"][0]})
    return rows


def test_grpo_with_image_prompts_equals_plain(tmp_path):
    plain, fast, processor = _twins()
    dataset = Dataset.from_list(_image_prompts(8))
    trainers = {}

    def make(model):
        args = trl.GRPOConfig(**_common(tmp_path, num_generations=4, max_completion_length=8, beta=0.1,
                                        generation_batch_size=8))  # fmt: skip
        trainer = trl.GRPOTrainer(model=model, reward_funcs=_vowel_reward, args=args, train_dataset=dataset,
                                  processing_class=processor)  # fmt: skip
        trainers[id(model)] = trainer
        return trainer

    p, f = _run(make, plain, "trl"), _run(make, fast, "fastft")
    _compare(p, f, ["loss", "reward", "kl"])
    assert any(h["grad_norm"] > 0 for h in f) and any(h.get("reward_std", 0) > 0 for h in f)

    # One batch scored by both trained policies: per-token log-probs of a completion after an image prompt.
    collator = VisionDataCollator(fast, processor)
    batch = collator(va.image_examples(2, seed=3))
    completion = 6
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logps = {}
    for name, model in (("plain", plain), ("fast", fast)):
        trainer = trainers[id(model)]
        with torch.no_grad():
            logps[name], _, _ = trainer._get_per_token_logps_and_entropies(
                model,
                inputs["input_ids"],
                inputs["attention_mask"],
                completion,
                pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"],
                num_images=[1, 1],
                mm_token_type_ids=inputs["mm_token_type_ids"],
            )
    assert logps["fast"].shape == (2, completion)
    # fp32, summation order only: 1e-5 absolute on log-probs of about -7.6 (as the text trainers' test)
    torch.testing.assert_close(logps["fast"], logps["plain"], rtol=0, atol=1e-5)
