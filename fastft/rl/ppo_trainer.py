"""PPO for causal LMs (TRL removed its trainer): a value head, GAE, clipped objectives, a KL penalty, any reward.

One PPO iteration (one step of ``max_steps``):

1. Rollout, without gradients: prompts (TRL's ``"prompt"`` column, standard text or conversational) are
   tokenized (chat template for conversations), left-padded and completed by ``model.generate`` (sampling at
   ``temperature``, KV cache on). One backbone forward of prompt + completion gives, through fastft's log-prob
   head, the completion tokens' log-probs and entropies (no batch x seq x vocab logits) and, through the value
   head on the same hidden states, their values. The reference policy's log-probs come from the same model with
   its adapter disabled (PEFT), or from ``ref_model`` / a frozen copy made at start. Scores come from reward
   functions (GRPO's convention, ``f(prompts, completions, completion_ids=..., **columns) -> list[float]``) and
   reward models (sequence classifiers scoring prompt + completion at its last non-pad token), weighted, summed.
2. Advantages: per-token rewards ``-kl_coef * KL`` plus the score on the last token, GAE, whitening
   (:mod:`fastft.rl.ppo_losses`).
3. Update: ``num_ppo_epochs`` passes over the rollout in ``num_mini_batches`` shuffled mini-batches, one optimizer
   step each, minimising the clipped policy loss + ``vf_coef`` x the clipped value loss.

Why a ``transformers.Trainer`` subclass with its own ``train`` loop (as TRL's removed PPO had) rather than
``Trainer``'s loop: PPO's data flow (one rollout, then several epochs of mini-batches over it) does not map onto one
dataloader batch per optimizer step without a repeating sampler and a rollout buffer hidden in ``_prepare_inputs``;
written out, the loop reads top to bottom. ``Trainer`` still provides the config, accelerate (devices, mixed
precision), optimizer and scheduler creation, callbacks, logging (``report_to``) and ``save_model``.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
)
from transformers.trainer_utils import TrainOutput

try:
    from trl.data_utils import apply_chat_template, is_conversational
except ImportError as err:  # trl is optional for fastft; PPOTrainer uses its dataset conventions
    raise ImportError("fastft.rl.PPOTrainer follows TRL's dataset conventions and needs TRL: pip install trl") from err

from fastft.rl.heads import backbone_hidden_states, head_log_probs, run_in_root
from fastft.rl.ppo_config import PPOConfig
from fastft.rl.ppo_losses import (
    gae_advantages,
    kl_estimate,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from fastft.rl.value_head import ValueHead

RewardFunc = str | PreTrainedModel | Callable[..., list[float | None]]


def completion_scores(
    model: nn.Module,
    value_head: nn.Module | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(log-probs, entropies or None, values or None) of the completion tokens ``labels`` (B, C), -100 = padding.

    ``input_ids`` is the left-padded prompt followed by the C completion tokens. One backbone forward: hidden state
    t of the completion (the one before its token t) feeds both fastft's log-prob head and the value head.
    """

    def compute(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens
        hidden = backbone_hidden_states(model, input_ids, attention_mask, position_ids=position_ids)
        hidden = hidden[:, -labels.shape[1] - 1 : -1]
        out = head_log_probs(model, hidden, labels, temperature=temperature, entropy=entropy)
        values = value_head(hidden) if value_head is not None else None
        return out.log_probs, out.entropy, values

    # Backbone, head and value head in one function: on an FSDP2-sharded policy it runs under the root unit's
    # all-gather (run_in_root); the value head's parameters are not FSDP2's (see PPOTrainer._sync_value_head).
    return run_in_root(model, compute, input_ids, attention_mask, labels)


class _PolicyWithValue(nn.Module):
    """Policy and value head as one module, so accelerate prepares both (mixed precision, DDP) together."""

    def __init__(self, policy: nn.Module, value_head: ValueHead) -> None:
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(self, input_ids, attention_mask, labels, temperature: float, entropy: bool = False):
        return completion_scores(
            self.policy, self.value_head, input_ids, attention_mask, labels, temperature=temperature, entropy=entropy
        )


def _pad_left(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, -len(row) :] = torch.tensor(row)
            mask[i, -len(row) :] = 1
    return ids.to(device), mask.to(device)


def _chunks(n: int, size: int) -> Iterator[slice]:
    return (slice(start, start + size) for start in range(0, n, size))


def _frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


def _clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over FSDP2's DTensor gradients and plain ones (the value head) together.

    torch's own refuses the mix (its foreach norm and the stack of norms need one kind). The sharded gradients'
    norm is reduced across shards once (``full_tensor``); the coefficient is torch's, max_norm / (norm + 1e-6)
    capped at 1. Returns the total norm.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    groups = [[g for g in grads if isinstance(g, DTensor)], [g for g in grads if not isinstance(g, DTensor)]]
    norms = [torch.nn.utils.get_total_norm(group) for group in groups if group]
    norms = [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    coefficient = min(1.0, max_norm / (total.item() + 1e-6))
    for group in groups:
        if group and coefficient < 1.0:
            torch._foreach_mul_(group, coefficient)
    return total


def _disable_dropout(model: nn.Module) -> None:
    """Dropout off (modules and attention's float rate), so the update's first ratio is exactly 1."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class PPOTrainer(Trainer):
    """PPO with a value head on the policy's backbone (see the module docstring), configured by :class:`PPOConfig`.

    ``model``: a transformers causal LM, a fastft-patched one, or a PEFT model (only the adapter and the value head
    train; the reference is the model with its adapter disabled). ``reward_funcs``: a callable, a reward model
    (``*ForSequenceClassification`` with one label, or its hub id / path), or a list of them, as in TRL's
    ``GRPOTrainer``; ``reward_processing_classes`` the reward models' tokenizers (default: loaded from their
    config's path). ``ref_model``: the reference for a non-PEFT model (default: a frozen copy of ``model`` made
    here; none when ``kl_coef == 0``). ``value_head``: a :class:`ValueHead` to continue from (default: zeros).
    An optimizer passed in ``optimizers`` gets the value head's parameters added as a param group if it lacks them.
    FSDP2: shard ``trainer.model`` with :func:`fastft.distributed.shard` and call
    :func:`fastft.distributed.prepare_trainer` before ``train``; the value head stays replicated, its gradient
    averaged over the ranks before each step.
    """

    def __init__(
        self,
        model: nn.Module,
        reward_funcs: RewardFunc | list[RewardFunc],
        args: PPOConfig | None = None,
        train_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        *,
        reward_processing_classes: PreTrainedTokenizerBase | list[PreTrainedTokenizerBase | None] | None = None,
        ref_model: nn.Module | None = None,
        value_head: ValueHead | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"PPOTrainer(model=...) expects a loaded model, got {type(model).__name__}; load it first, e.g. "
                "`model, tokenizer = fastft.FastModel.from_pretrained(name)`"
            )
        args = args if args is not None else PPOConfig()
        if not isinstance(args, PPOConfig):
            raise TypeError(f"PPOTrainer(args=...) expects a fastft.rl.PPOConfig, got {type(args).__name__}")
        if processing_class is None or getattr(processing_class, "pad_token_id", None) is None:
            raise ValueError("PPOTrainer needs processing_class=<the model's tokenizer> with a pad token set")
        columns = getattr(train_dataset, "column_names", None) or (list(train_dataset[0]) if train_dataset else [])
        if "prompt" not in columns:
            raise ValueError(f"PPOTrainer's train_dataset needs a 'prompt' column (TRL's convention); has {columns}")
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        device = self.accelerator.device
        self.is_peft = hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
        if args.disable_dropout:
            _disable_dropout(model)
        self.value_head = (value_head or ValueHead(model.get_output_embeddings().weight.shape[-1])).to(device)
        self.ref_model = self._reference_model(ref_model)
        self.reward_funcs, self.reward_processing_classes, self.reward_func_names = self._reward_sources(
            reward_funcs, reward_processing_classes
        )
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(
                f"PPOConfig.reward_weights has {len(weights)} entries for {len(self.reward_funcs)} sources"
            )
        self.reward_weights = torch.tensor(weights, dtype=torch.float32, device=device)
        eos = {processing_class.eos_token_id, *self._ids(getattr(model.generation_config, "eos_token_id", None))}
        self.eos_token_ids = sorted(i for i in eos if i is not None)
        self.generation_config = GenerationConfig(
            max_new_tokens=args.max_completion_length,
            do_sample=True,
            temperature=args.temperature,
            top_k=0,  # sample from the whole distribution the log-probs are computed on
            top_p=1.0,
            pad_token_id=processing_class.pad_token_id,
            eos_token_id=self.eos_token_ids,
            use_cache=True,
            **(args.generation_kwargs or {}),
        )
        self._shuffle = torch.Generator().manual_seed(args.seed)
        self._policy_with_value: nn.Module | None = None
        self._sharded = False  # an FSDP2-sharded policy (set in train)

    # ------------------------------------------------------------------------------------------------- set-up

    @staticmethod
    def _ids(value: int | list[int] | None) -> list[int]:
        return [] if value is None else [value] if isinstance(value, int) else list(value)

    def _reference_model(self, ref_model: nn.Module | None) -> nn.Module | None:
        if ref_model is not None:
            if self.is_peft:
                raise ValueError("ref_model with a PEFT model: the reference is the model with its adapter disabled")
            return _frozen(ref_model).to(self.accelerator.device)
        if self.args.kl_coef == 0 or self.is_peft:
            return None
        return _frozen(copy.deepcopy(self.model))

    def _reward_sources(self, reward_funcs, processing_classes) -> tuple[list, list, list[str]]:
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs or any(f is None for f in funcs):
            raise ValueError("PPOTrainer needs reward_funcs: callables and/or sequence-classification reward models")
        if not isinstance(processing_classes, (list, tuple)):
            processing_classes = [processing_classes] * len(funcs)
        if len(processing_classes) != len(funcs):
            raise ValueError(f"{len(processing_classes)} reward_processing_classes for {len(funcs)} reward_funcs")
        classes, names = list(processing_classes), []
        for i, func in enumerate(funcs):
            if isinstance(func, str):
                func = funcs[i] = AutoModelForSequenceClassification.from_pretrained(func, num_labels=1)
            if isinstance(func, nn.Module):
                path = func.config._name_or_path
                tokenizer = classes[i] = classes[i] or AutoTokenizer.from_pretrained(path)
                if tokenizer.pad_token_id is None:
                    raise ValueError(f"reward model {path!r}: its tokenizer has no pad token; set one before training")
                func.config.get_text_config().pad_token_id = tokenizer.pad_token_id  # it scores the last non-pad
                _frozen(func).to(self.accelerator.device)
                names.append(path.rstrip("/").split("/")[-1] or type(func).__name__)
            elif callable(func):
                names.append(getattr(func, "__name__", type(func).__name__))
            else:
                raise TypeError(f"reward_funcs[{i}] is a {type(func).__name__}: pass a callable or a reward model")
        return funcs, classes, names

    def create_optimizer(self, *args, **kwargs) -> torch.optim.Optimizer:
        """Trainer's optimizer over the policy's trainable parameters, plus the value head (no weight decay)."""
        optimizer = super().create_optimizer(*args, **kwargs)
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        head = [p for p in self.value_head.parameters() if id(p) not in known]
        if head:
            optimizer.add_param_group({"params": head, "weight_decay": 0.0})
        return optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The policy as ``Trainer`` saves it (the adapter for PEFT), the tokenizer, and ``value_head.safetensors``."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.value_head.save_pretrained(output_dir or self.args.output_dir)

    # ------------------------------------------------------------------------------------------------ rollout

    def _tokenize_prompts(self, prompts: list) -> list[list[int]]:
        if is_conversational({"prompt": prompts[0]}):
            rows = self.processing_class.apply_chat_template(
                prompts, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        else:
            rows = self.processing_class(text=prompts)["input_ids"]
        limit = self.args.max_prompt_length
        return [list(row[-limit:]) if limit else list(row) for row in rows]

    @torch.no_grad()
    def reference_log_probs(self, input_ids, attention_mask, labels) -> torch.Tensor:
        """Completion log-probs under the reference: the PEFT model with its adapter off, or the reference model."""
        if self.is_peft:
            with self.model.disable_adapter(), self.accelerator.autocast():
                return completion_scores(
                    self.model, None, input_ids, attention_mask, labels, temperature=self.args.temperature
                )[0]
        if self.ref_model is None:
            raise ValueError("no reference policy: kl_coef is 0 and no ref_model was passed (the model is not PEFT)")
        with self.accelerator.autocast():
            return completion_scores(
                self.ref_model, None, input_ids, attention_mask, labels, temperature=self.args.temperature
            )[0]

    @torch.no_grad()
    def _reward_scores(self, examples: list[dict], prompts: list, completions: list, completion_ids: list):
        """(B, number of reward sources) scores; None from a reward function becomes NaN (ignored in the sum)."""
        device, batch = self.accelerator.device, self.args.local_rollout_forward_batch_size
        scores = torch.zeros(len(prompts), len(self.reward_funcs), device=device)
        skip = ("prompt", "completion", "completion_ids")  # passed by name (GRPO's convention)
        columns = {key: [ex[key] for ex in examples] for key in examples[0] if key not in skip}
        for i, (func, tokenizer) in enumerate(zip(self.reward_funcs, self.reward_processing_classes, strict=True)):
            if isinstance(func, nn.Module):
                pairs = zip(prompts, completions, strict=True)
                if is_conversational({"prompt": prompts[0]}):
                    texts = [apply_chat_template({"messages": p + c}, tokenizer)["text"] for p, c in pairs]
                else:
                    texts = [p + c for p, c in pairs]
                for part in _chunks(len(texts), batch):
                    inputs = tokenizer(
                        texts[part], return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False
                    ).to(device)
                    scores[part, i] = func(**inputs).logits[:, 0].float()
            else:
                out = func(
                    prompts=prompts, completions=completions, completion_ids=completion_ids, trainer_state=self.state,
                    **columns,
                )  # fmt: skip
                if len(out) != len(prompts):
                    raise ValueError(
                        f"reward function {self.reward_func_names[i]!r} returned {len(out)} rewards for "
                        f"{len(prompts)} completions; return one float (or None) per completion"
                    )
                scores[:, i] = torch.tensor([math.nan if r is None else r for r in out], dtype=torch.float32)
        return scores

    @torch.no_grad()
    def _rollout(self, examples: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        args, device, pad = self.args, self.accelerator.device, self.processing_class.pad_token_id
        prompts = [ex["prompt"] for ex in examples]
        prompt_ids, prompt_mask = _pad_left(self._tokenize_prompts(prompts), pad, device)
        self.model.eval()
        generated = self.accelerator.unwrap_model(self.model).generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=self.generation_config
        )
        completion_ids = generated[:, prompt_ids.shape[1] :]
        # A completion ends at its first EOS (kept); without one it runs to max_completion_length.
        is_eos = torch.isin(completion_ids, torch.tensor(self.eos_token_ids, device=device))
        has_eos = is_eos.any(1)
        end = torch.where(has_eos, is_eos.int().argmax(1), completion_ids.shape[1] - 1)
        mask = torch.arange(completion_ids.shape[1], device=device)[None] <= end[:, None]
        length = int(mask.sum(1).max())
        mask, completion_ids = mask[:, :length], completion_ids[:, :length].masked_fill(~mask[:, :length], pad)
        input_ids = torch.cat([prompt_ids, completion_ids], 1)
        attention_mask = torch.cat([prompt_mask, mask.long()], 1)
        labels = completion_ids.masked_fill(~mask, -100)

        parts = defaultdict(list)
        for part in _chunks(len(prompts), args.local_rollout_forward_batch_size):
            logprobs, entropy, values = self._policy_with_value(
                input_ids[part], attention_mask[part], labels[part], args.temperature, entropy=True
            )
            parts["logprobs"].append(logprobs)
            parts["entropy"].append(entropy)
            parts["values"].append(values)
            if args.kl_coef > 0:
                parts["ref"].append(self.reference_log_probs(input_ids[part], attention_mask[part], labels[part]))
        logprobs, entropy, values = (torch.cat(parts[k]) for k in ("logprobs", "entropy", "values"))

        completion_lists = [row[keep].tolist() for row, keep in zip(completion_ids, mask, strict=True)]
        texts = self.processing_class.batch_decode(completion_lists, skip_special_tokens=True)
        if is_conversational({"prompt": prompts[0]}):
            completions = [[{"role": "assistant", "content": text}] for text in texts]
        else:
            completions = texts
        per_source = self._reward_scores(examples, prompts, completions, completion_lists)
        scores = (per_source * self.reward_weights).nansum(1)
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~has_eos).float()

        kl = torch.zeros_like(logprobs)  # kl_coef == 0: no reference pass
        if parts["ref"]:
            kl = kl_estimate(logprobs, torch.cat(parts["ref"]), args.kl_estimator) * mask
        rewards = token_rewards(scores, kl, mask, args.kl_coef)
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae_advantages(rewards, values, mask, args.gamma, args.lam)
        advantages = masked_whiten(advantages, mask)

        non_score = (-args.kl_coef * kl).sum(1)
        metrics = {
            "objective/scores": scores.mean().item(),
            "objective/kl": kl.sum(1).mean().item(),
            "objective/non_score_reward": non_score.mean().item(),
            "objective/rlhf_reward": (scores + non_score).mean().item(),
            "objective/entropy": masked_mean(entropy, mask).item(),
            "val/num_eos_tokens": has_eos.sum().item(),
            "completions/mean_length": mask.sum(1).float().mean().item(),
        }
        for name, column in zip(self.reward_func_names, per_source.T, strict=True):
            metrics[f"rewards/{name}/mean"] = column.nanmean().item()
        rollout = {
            "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "mask": mask,
            "logprobs": logprobs, "values": values, "advantages": advantages, "returns": returns,
        }  # fmt: skip
        return rollout, metrics

    # ------------------------------------------------------------------------------------------------- update

    def _optimise(self, rollout: dict[str, torch.Tensor]) -> dict[str, float]:
        """``num_ppo_epochs`` shuffled passes over the rollout, one optimizer step per mini-batch."""
        args = self.args
        size = len(rollout["input_ids"])
        mini, micro = size // args.num_mini_batches, args.per_device_train_batch_size
        stats = defaultdict(list)
        self.model.train()
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(size, generator=self._shuffle).to(self.accelerator.device)
            for start in range(0, size, mini):
                for first in range(start, start + mini, micro):
                    batch = {key: value[order[first : first + micro]] for key, value in rollout.items()}
                    logprobs, _, values = self._policy_with_value(
                        batch["input_ids"], batch["attention_mask"], batch["labels"], args.temperature
                    )
                    mask = batch["mask"]
                    pg_loss, pg_clipfrac, approx_kl = policy_loss(
                        logprobs, batch["logprobs"], batch["advantages"], mask, args.cliprange
                    )
                    vf_loss, vf_clipfrac = value_loss(
                        values, batch["values"], batch["returns"], mask, args.cliprange_value
                    )
                    loss = pg_loss + args.vf_coef * vf_loss
                    self.accelerator.backward(loss / args.gradient_accumulation_steps)
                    ratio = masked_mean(torch.exp(logprobs.detach() - batch["logprobs"]), mask)
                    for name, value in (("loss", loss), ("loss/policy_avg", pg_loss), ("loss/value_avg", vf_loss),
                                        ("policy/approxkl_avg", approx_kl), ("policy/clipfrac_avg", pg_clipfrac),
                                        ("val/clipfrac_avg", vf_clipfrac), ("val/ratio", ratio)):  # fmt: skip
                        stats[name].append(value.item())
                if self._sharded:
                    self._sync_value_head()
                if args.max_grad_norm and self._sharded:
                    _clip_grad_norm(list(self._policy_with_value.parameters()), args.max_grad_norm)
                elif args.max_grad_norm:
                    self.accelerator.clip_grad_norm_(self._policy_with_value.parameters(), args.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        return {name: sum(values) / len(values) for name, values in stats.items()}

    def _sync_value_head(self) -> None:
        """Average the value head's gradients over the ranks of an FSDP2-sharded policy, before clipping and step.

        The value head is not part of the sharded model: FSDP2 reduces only the policy's gradients. It stays a
        plain module replicated on every rank (H + 1 parameters: sharding it would save nothing worth a second
        FSDP root) and is kept identical by averaging its gradient over the world, as DDP would: every rank
        starts from the same (zero) weights and steps the same optimizer on the same averaged gradient.
        """
        grads = [p.grad for p in self.value_head.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for weight and bias
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for grad, averaged in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(averaged.view_as(grad))

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> TrainOutput:
        """Run PPO iterations (rollout, advantages, update) until ``max_steps`` / ``total_episodes``."""
        if resume_from_checkpoint:
            raise NotImplementedError(
                "PPOTrainer does not resume from checkpoints; start a new run from the saved policy and "
                "ValueHead.from_pretrained(<checkpoint dir>)"
            )
        args, dataset = self.args, self.train_dataset
        rollout_size = args.rollout_batch_size
        if len(dataset) < rollout_size:
            raise ValueError(
                f"train_dataset has {len(dataset)} prompts, fewer than one rollout (per_device_train_batch_size x "
                f"gradient_accumulation_steps x num_mini_batches = {rollout_size}); lower those or add prompts"
            )
        loader = DataLoader(
            dataset, batch_size=rollout_size, shuffle=True, drop_last=True, collate_fn=list,
            generator=torch.Generator().manual_seed(args.seed),
        )  # fmt: skip
        episodes_per_step = rollout_size * self.accelerator.num_processes
        if args.max_steps > 0:
            steps = args.max_steps
        else:
            steps = math.ceil((args.total_episodes or args.num_train_epochs * len(dataset)) / episodes_per_step)
        self.create_optimizer_and_scheduler(num_training_steps=steps * args.num_ppo_epochs * args.num_mini_batches)
        if args.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs or {"use_reentrant": False}
            )
        policy_with_value = _PolicyWithValue(self.model, self.value_head)
        self._sharded = isinstance(self.model, FSDPModule)
        if self._sharded:
            # FSDP2 (fastft.distributed.shard) averages the policy's gradients; a DDP wrap around it would fail
            # on its DTensors. Prepared for autocast only; the value head is synchronised by _sync_value_head.
            if "generate" not in vars(self.model):
                raise ValueError(
                    "PPOTrainer: the model is sharded with FSDP2; call fastft.distributed.prepare_trainer(trainer) "
                    "before trainer.train() (it registers generate with FSDP2, so rollouts run on gathered weights)."
                )
            self._policy_with_value = self.accelerator.prepare_model(
                policy_with_value, device_placement=False, evaluation_mode=True
            )
            self.optimizer = self.accelerator.prepare_optimizer(self.optimizer)
        else:
            self._policy_with_value, self.optimizer = self.accelerator.prepare(policy_with_value, self.optimizer)
        self.callback_handler.optimizer, self.callback_handler.lr_scheduler = self.optimizer, self.lr_scheduler
        self.state.max_steps, self.state.global_step, self.state.epoch = steps, 0, 0.0
        self.state.compute_steps(args, steps)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)

        def batches():
            while True:
                yield from loader

        start, losses, prompts = time.time(), [], batches()
        while self.state.global_step < steps and not self.control.should_training_stop:
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            rollout, metrics = self._rollout(next(prompts))
            metrics.update(self._optimise(rollout))
            losses.append(metrics["loss"])
            self.state.global_step += 1
            self.state.epoch = self.state.global_step * episodes_per_step / len(dataset)
            metrics.update(episode=self.state.global_step * episodes_per_step, lr=self.lr_scheduler.get_last_lr()[0])
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if self.control.should_log:
                self.log(metrics)
            if self.control.should_save:
                self.save_model(os.path.join(args.output_dir, f"checkpoint-{self.state.global_step}"))
                self.control = self.callback_handler.on_save(args, self.state, self.control)
        self.model.eval()
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        train_loss = sum(losses) / max(len(losses), 1)
        return TrainOutput(self.state.global_step, train_loss, {"train_runtime": time.time() - start})
