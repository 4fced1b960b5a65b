"""Configuration of :class:`fastft.rl.PPOTrainer`: ``transformers.TrainingArguments`` plus PPO's fields.

Field names are those of TRL's removed ``PPOConfig`` (``num_ppo_epochs``, ``num_mini_batches``, ``cliprange``,
``cliprange_value``, ``vf_coef``, ``gamma``, ``lam``, ``kl_coef``, ``kl_estimator``, ``whiten_rewards``,
``response_length``, ``temperature``, ``missing_eos_penalty``, ``total_episodes``,
``local_rollout_forward_batch_size``) and of ``GRPOConfig`` for what GRPO has since named differently
(``max_completion_length``, ``max_prompt_length``, ``reward_weights``, ``generation_kwargs``).

Batch sizes follow TRL's PPO: one rollout (a PPO iteration, one "step" of ``max_steps``) samples
``per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches`` prompts per process; it is then
optimised for ``num_ppo_epochs`` epochs of ``num_mini_batches`` mini-batches, one optimizer step per mini-batch,
each mini-batch in ``gradient_accumulation_steps`` micro-batches of ``per_device_train_batch_size``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class PPOConfig(TrainingArguments):
    """``TrainingArguments`` plus PPO's rollout, reward and loss settings (see the module docstring).

    ``max_steps`` counts PPO iterations (rollout + its epochs); without it the run lasts ``total_episodes``
    completions (default: ``num_train_epochs`` passes over the dataset). ``response_length`` is TRL's old name
    for ``max_completion_length`` and wins when set. ``learning_rate`` defaults to 3e-6, ``logging_steps`` to 1
    (one log per iteration) and ``remove_unused_columns`` to False (reward functions receive the dataset's
    other columns).
    """

    # Generation
    max_prompt_length: int | None = field(
        default=512, metadata={"help": "Prompts longer than this keep their last tokens; None keeps them whole."}
    )
    max_completion_length: int = field(default=53, metadata={"help": "Tokens sampled per completion."})
    response_length: int | None = field(
        default=None, metadata={"help": "TRL's removed PPOConfig name of max_completion_length; wins when set."}
    )
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (log-probs use the same one)."})
    generation_kwargs: dict | None = field(
        default=None, metadata={"help": "Extra transformers.GenerationConfig fields (top_p, top_k, min_p, ...)."}
    )
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of completions that end without EOS."}
    )
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Sequences per no-grad forward pass (policy, reference, reward model)."}
    )
    total_episodes: int | None = field(
        default=None, metadata={"help": "Completions to train on; default num_train_epochs * len(train_dataset)."}
    )
    # Rewards
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward function (default 1 each); scores are summed."}
    )
    # PPO
    num_ppo_epochs: int = field(default=4, metadata={"help": "Optimisation epochs over each rollout."})
    num_mini_batches: int = field(default=1, metadata={"help": "Mini-batches (optimizer steps) per epoch."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip range epsilon."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip range around the rollout's values."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    kl_coef: float = field(default=0.05, metadata={"help": "Per-token KL penalty against the reference policy."})
    kl_estimator: str = field(default="k1", metadata={"help": "'k1' (log ratio) or 'k3' (non-negative)."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the per-token rewards (no centring)."})
    disable_dropout: bool = field(
        default=True, metadata={"help": "Set dropout to 0 in the policy, so rollout and update ratios start at 1."}
    )
    # TrainingArguments defaults changed for PPO
    learning_rate: float = field(default=3e-6, metadata={"help": "AdamW learning rate."})
    logging_steps: float = field(default=1, metadata={"help": "Log every X PPO iterations."})
    remove_unused_columns: bool | None = field(
        default=False, metadata={"help": "Keep the dataset's columns: reward functions receive them."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.response_length is not None:
            self.max_completion_length = self.response_length
        checks = {
            "max_completion_length": self.max_completion_length >= 1,
            "temperature": self.temperature > 0,
            "num_ppo_epochs": self.num_ppo_epochs >= 1,
            "num_mini_batches": self.num_mini_batches >= 1,
            "cliprange": self.cliprange > 0,
            "cliprange_value": self.cliprange_value > 0,
            "local_rollout_forward_batch_size": self.local_rollout_forward_batch_size >= 1,
            "kl_coef": self.kl_coef >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"PPOConfig.{name} = {getattr(self, name)!r} is out of range; see its help text")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"PPOConfig.kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")

    @property
    def rollout_batch_size(self) -> int:
        """Prompts per rollout on this process: micro-batch x gradient accumulation x mini-batches."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches
