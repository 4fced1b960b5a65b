"""fastft.rl.PPOTrainer on tiny Llamas: learning a toy reward, a reward model, PEFT's reference, a patched model.

Every run uses fastft's log-prob head on its torch path (``force_backend("torch")``): Triton's interpreter would
make each forward ~30x slower, and the Triton kernel is checked against the same reference in
tests/kernels. One torch thread (the models are tiny).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import LlamaForSequenceClassification

from fastft.kernels._dispatch import force_backend
from fastft.rl.ppo_config import PPOConfig
from fastft.rl.ppo_trainer import PPOTrainer, completion_scores
from fastft.rl.value_head import VALUE_HEAD_FILE, ValueHead
from tests.rl.tiny import instruction_pairs, tiny_config, tiny_llama, tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ppo.py"


@pytest.fixture(autouse=True)
def _torch_head():
    with force_backend("torch"):
        yield


def _config(tmp_path, **overrides) -> PPOConfig:
    settings = {
        "output_dir": str(tmp_path), "max_steps": 2, "per_device_train_batch_size": 4, "num_mini_batches": 2,
        "num_ppo_epochs": 2, "max_completion_length": 6, "temperature": 1.0, "learning_rate": 1e-3,
        "lr_scheduler_type": "constant", "report_to": "none", "use_cpu": True, "save_strategy": "no",
        "logging_steps": 1, "disable_tqdm": True, "dataloader_num_workers": 0, "seed": 0,
    }  # fmt: skip
    return PPOConfig(**{**settings, **overrides})


def _text_prompts(n: int = 32) -> Dataset:
    return Dataset.from_list(instruction_pairs(n))  # "prompt" + an extra "completion" column


def _chat_prompts(n: int = 16) -> Dataset:
    pairs = instruction_pairs(n)
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": p["prompt"]}], "task": i % 3} for i, p in enumerate(pairs)]
    )


def _history(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def _low_id_share(prompts, completions, completion_ids, **kwargs):
    """Toy reward: +1 for each token of the chosen set (the 256 lowest ids, 1/8 of the vocabulary), per token."""
    return [sum(t < 256 for t in ids) / len(ids) for ids in completion_ids]


def test_mean_reward_rises_on_a_toy_reward(tmp_path):
    # Seed 0, full fine-tuning of the tiny Llama: the score starts near 1/8 (uniform sampling) and reaches
    # ~0.75 after 30 iterations (0.87 with seed 1); asserting a rise of 0.3 between the first and the last five
    # iterations leaves a wide margin for run-to-run noise of a few hundredths.
    config = _config(
        tmp_path, max_steps=30, per_device_train_batch_size=8, num_ppo_epochs=4, max_completion_length=8,
        learning_rate=3e-3, kl_coef=0.01,
    )  # fmt: skip
    trainer = PPOTrainer(tiny_llama(0), _low_id_share, config, _text_prompts(64), tokenizer())
    trainer.train()
    scores = _history(trainer, "objective/scores")
    assert len(scores) == 30
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert first < 0.2 and last > first + 0.3, scores
    assert _history(trainer, "rewards/_low_id_share/mean") == scores  # one reward source, weight 1


def test_reward_model_scores_the_last_non_pad_token(tmp_path):
    tok = tokenizer()
    torch.manual_seed(1)
    reward_model = LlamaForSequenceClassification(tiny_config(num_labels=1, pad_token_id=None))
    seen = {}

    def record(prompts, completions, completion_ids, task, trainer_state, **kwargs):
        seen.update(prompts=prompts, completions=completions, task=task)  # dataset columns reach reward functions
        return [0.0] * len(prompts)

    config = _config(tmp_path, max_steps=1, num_ppo_epochs=1, reward_weights=[1.0, 0.0])
    trainer = PPOTrainer(
        tiny_llama(0), [reward_model, record], config, _chat_prompts(), tok, reward_processing_classes=[tok, None]
    )
    trainer.train()
    assert reward_model.config.pad_token_id == tok.pad_token_id
    assert seen["completions"][0][0]["role"] == "assistant" and len(seen["task"]) == 8
    logged = _history(trainer, "rewards/" + trainer.reward_func_names[0] + "/mean")
    assert len(logged) == 1 and math.isfinite(logged[0])
    # Independently: each conversation rendered by the chat template, scored alone (no padding), last position.
    expected = []
    for prompt, completion in zip(seen["prompts"], seen["completions"], strict=True):
        text = tok.apply_chat_template(prompt + completion, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            expected.append(reward_model(input_ids=ids).logits[0, 0].item())
    assert logged[0] == pytest.approx(sum(expected) / len(expected), rel=1e-4, abs=1e-5)
    assert _history(trainer, "objective/scores")[0] == pytest.approx(logged[0], rel=1e-6)


def _peft_model():
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    return get_peft_model(tiny_llama(0), lora)  # random A and B: the adapter changes the outputs from the start


def _rollout_batch(n: int = 3, prompt_length: int = 9, completion_length: int = 5):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 2000, (n, prompt_length + completion_length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding of a prompt
    labels = ids[:, prompt_length:].clone()
    labels[1, 3:] = -100  # a completion that ended early
    mask[1, prompt_length + 3 :] = 0
    return ids, mask, labels


def test_peft_reference_is_the_base_model_with_the_adapter_off(tmp_path):
    model, base = _peft_model(), tiny_llama(0)
    trainer = PPOTrainer(model, _low_id_share, _config(tmp_path), _text_prompts(8), tokenizer())
    assert trainer.ref_model is None  # no copy of the weights
    ids, mask, labels = _rollout_batch()
    ref = trainer.reference_log_probs(ids, mask, labels)
    with torch.no_grad():
        expected = completion_scores(base, None, ids, mask, labels)[0]
        policy = completion_scores(model, None, ids, mask, labels)[0]
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-5)  # fp32, same weights, same kernels
    assert (policy - expected).abs().max() > 1e-2  # while the adapter is on, the policy differs
    assert ref[1, 3:].eq(0).all()  # padding scores 0


def test_peft_run_trains_adapter_and_value_head_and_saves_both(tmp_path):
    model = _peft_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = PPOTrainer(model, _low_id_share, _config(tmp_path, kl_coef=0.1), _text_prompts(8), tokenizer())
    trainer.train()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, adapter[n]) for n, p in model.named_parameters() if n in adapter)
    assert trainer.value_head.summary.weight.abs().sum() > 0  # moved from its zero initialisation
    assert len(_history(trainer, "objective/kl")) == 2
    trainer.save_model(str(tmp_path / "out"))
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "model.safetensors").exists()  # only the adapter for a PEFT policy
    loaded = ValueHead.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded.summary.weight, trainer.value_head.summary.weight.cpu())


def test_patched_model_scores_like_the_plain_model_and_trains(tmp_path):
    import fastft

    plain, patched = tiny_llama(0), fastft.patch(tiny_llama(0))
    ids, mask, labels = _rollout_batch()
    head = ValueHead(64)
    torch.nn.init.normal_(head.summary.weight)
    with torch.no_grad():
        a = completion_scores(plain, head, ids, mask, labels, temperature=0.7, entropy=True)
        b = completion_scores(patched, head, ids, mask, labels, temperature=0.7, entropy=True)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)  # fastft's fp32 kernels vs transformers' layers
    trainer = PPOTrainer(patched, _low_id_share, _config(tmp_path, kl_estimator="k3"), _chat_prompts(8), tokenizer())
    assert trainer.ref_model is not None and trainer.ref_model is not patched
    trainer.train()
    assert len(_history(trainer, "loss/policy_avg")) == 2
    assert all(k >= 0 for k in _history(trainer, "objective/kl"))  # k3 is non-negative


def test_errors_name_the_argument(tmp_path):
    tok = tokenizer()
    with pytest.raises(ValueError, match="'prompt' column"):
        PPOTrainer(tiny_llama(0), _low_id_share, _config(tmp_path), Dataset.from_list([{"text": "a"}]), tok)
    with pytest.raises(ValueError, match="reward_weights"):
        PPOTrainer(tiny_llama(0), _low_id_share, _config(tmp_path, reward_weights=[1.0, 2.0]), _text_prompts(8), tok)
    with pytest.raises(ValueError, match="kl_estimator"):
        _config(tmp_path, kl_estimator="k2")
    trainer = PPOTrainer(tiny_llama(0), _low_id_share, _config(tmp_path, num_mini_batches=4), _text_prompts(8), tok)
    with pytest.raises(ValueError, match="fewer than one rollout"):
        trainer.train()


def test_example_runs_two_steps(tmp_path):
    spec = importlib.util.spec_from_file_location("ppo_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = ["--steps", "2", "--batch-size", "2", "--completion-length", "4", "--output-dir", str(tmp_path), "--save"]
    trainer = example.main(args)
    assert len(_history(trainer, "objective/scores")) == 2
    assert (tmp_path / VALUE_HEAD_FILE).is_file() and (tmp_path / "adapter_model.safetensors").is_file()
