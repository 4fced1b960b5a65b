"""CPO without full logits: TRL's ``trl.experimental.cpo.CPOTrainer`` with its forward computed from hidden states.

As :mod:`fastft.rl.orpo`: only ``concatenated_forward`` is replaced, by the backbone plus fastft's chunked log-prob
head, so no (batch, seq, vocab) logits exist; the losses are TRL's own ``cpo_loss``, so every ``loss_type`` TRL has
(``sigmoid``, ``hinge``, ``ipo``, ``simpo``, and ``alphapo``, which TRL's config turns into ``simpo`` with
``cpo_alpha=0``), label smoothing and the AlphaPO reward shaping (``alpha``) behave exactly as there.

What the forward computes, as TRL's: each sequence's response log-prob, summed, or averaged over its labelled
tokens for ``ipo`` and ``simpo``; the behaviour-cloning term ``nll`` = token-mean cross-entropy of the chosen
responses (their labels, the prompt masked), or a constant 0 when ``cpo_alpha == 0``; and for the logged
``logits/chosen`` / ``logits/rejected`` the mean logit over every position (here including the last, as TRL's
CPO takes ``all_logits`` unshifted) and the whole vocabulary, returned as (B, T) vocabulary means in place of the
(B, T, V) logits. Decoder-only models; see :mod:`fastft.rl.orpo` for what is not supported.
"""

from __future__ import annotations

import torch
from torch import nn

from fastft.rl.heads import head_log_probs, run_in_root
from fastft.rl.orpo import _check_decoder_only, _import_trl, _mean_logits, _pair_hidden_states, _sequence_log_probs

_TRLCPOTrainer, CPOConfig = _import_trl("cpo", ("CPOTrainer", "CPOConfig"))


class CPOTrainer(_TRLCPOTrainer):
    """TRL's ``CPOTrainer`` (same arguments, :class:`CPOConfig`, datasets) computing its loss without full logits.

    Only ``concatenated_forward`` differs: the backbone and fastft's chunked log-prob head replace the model's
    full forward, so no (batch, seq, vocab) tensor is created or saved for backward; loss (every ``loss_type``),
    gradients and logged metrics are TRL's. Decoder-only models; encoder-decoder ones raise
    ``NotImplementedError``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _check_decoder_only(self)

    def concatenated_forward(
        self, model: nn.Module, batch: dict[str, list | torch.LongTensor]
    ) -> tuple[torch.Tensor, ...]:
        """(chosen_logps, rejected_logps, chosen_mean_logits, rejected_mean_logits, nll_loss), as TRL's.

        The mean logits are (B, T) vocabulary means standing in for TRL's (B, T, V) logits (their ``.mean()`` is
        TRL's metric).
        """
        cat = self.concatenated_inputs(
            batch, is_encoder_decoder=False, padding_value=self.pad_token_id, device=self.accelerator.device
        )
        n_chosen = batch["chosen_labels"].shape[0]
        targets = cat["concatenated_labels"][:, 1:]  # position t scores token t+1; prompt and padding are -100
        mask = targets != -100

        def compute(input_ids, attention_mask, targets) -> tuple:
            # One function for backbone and head: run_in_root runs it under an FSDP2 root unit's all-gather.
            hidden = _pair_hidden_states(self, model, input_ids, attention_mask)
            return head_log_probs(model, hidden[:, :-1], targets).log_probs, _mean_logits(model, hidden)

        with self.accelerator.autocast():  # what accelerate runs model.forward in under bf16/fp16 mixed precision
            token_log_probs, mean_logits = run_in_root(
                model, compute, cat["concatenated_input_ids"], cat["concatenated_attention_mask"], targets
            )
        if self.cpo_alpha == 0:
            nll_loss = torch.tensor(0.0).to(self.accelerator.device)
        else:  # nn.CrossEntropyLoss's mean over the chosen rows' labelled tokens
            nll_loss = -token_log_probs[:n_chosen].sum() / mask[:n_chosen].sum()
        all_logps = _sequence_log_probs(token_log_probs, mask, average=self.loss_type in ("ipo", "simpo"))
        return (
            all_logps[:n_chosen],
            all_logps[n_chosen:],
            mean_logits[:n_chosen],
            mean_logits[n_chosen:],
            nll_loss,
        )


__all__ = ["CPOConfig", "CPOTrainer"]
