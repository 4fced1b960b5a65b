"""ORPO without full logits: TRL's ``trl.experimental.orpo.ORPOTrainer`` with its forward computed from hidden states.

TRL's ORPO (and CPO, :mod:`fastft.rl.cpo`) run ``model(...)`` on the concatenated chosen + rejected batch and keep
the (2B, T, V) logits for backward: at a 128k vocabulary that tensor is larger than the whole model's activations.
:class:`ORPOTrainer` overrides one method, ``concatenated_forward``: it runs the model's backbone and scores the
tokens with :func:`fastft.rl.heads.head_log_probs` (:func:`fastft.kernels.logprob_head.linear_log_probs`), which
works through the vocabulary a chunk of tokens at a time and keeps only (tokens, hidden)-sized tensors. Everything
else (config, dataset tokenisation, collator, the odds-ratio loss, metrics, logging, evaluation) is TRL's own.

The objective is TRL's, term for term: ``loss = nll - beta * mean(logsigmoid(log_odds))`` where ``nll`` is the
token-mean cross-entropy of the chosen sequences over prompt and response (every attended position), and the
odds ratio uses each sequence's *average* response log-prob. One head pass serves both terms when the chosen
labels are the chosen input ids with the prompt masked (as TRL's tokenisation makes them); a custom collator whose
labels differ gets a second pass over the chosen rows.

Logged ``logits/chosen`` and ``logits/rejected`` are TRL's means of the logits over every position (prompt and
padding included) and the whole vocabulary. Without a softcap the mean over the vocabulary is linear in the hidden
state, ``mean_v z_v = scale * (h . mean_v W_v + mean_v b_v)``, so it costs one (tokens, hidden) product; with a
softcap (Gemma 2/3) it comes from a no-grad head pass with ``stats=True``. ``concatenated_forward`` therefore
returns, where TRL returns the (B, T - 1, V) logits, their (B, T - 1) means over the vocabulary: ``.mean()`` of it
is the same number.

Not supported (NotImplementedError at construction or first step): encoder-decoder models, and MoE routers with
``output_router_logits=True`` (the router's auxiliary loss is computed inside ``*ForCausalLM.forward``, which this
path does not call).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from fastft.rl.heads import (
    _causal_lm,
    backbone_hidden_states,
    head_log_probs,
    head_transform,
    output_linear,
    run_in_root,
)


def _import_trl(module: str, names: tuple[str, ...]) -> tuple:
    """``names`` from ``trl.experimental.<module>``, with an error that says how to install TRL."""
    import importlib

    try:
        with warnings.catch_warnings():  # the notice that trl.experimental is unstable: fastft pins what it uses
            warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
            found = importlib.import_module(f"trl.experimental.{module}")
    except ImportError as err:
        raise ImportError(
            f"fastft.rl's {module.upper()} trainer builds on TRL's trl.experimental.{module}, which could not be "
            f"imported ({err}): pip install -U trl"
        ) from err
    return tuple(getattr(found, name) for name in names)


_TRLORPOTrainer, ORPOConfig = _import_trl("orpo", ("ORPOTrainer", "ORPOConfig"))


# ----------------------------------------------------------------------------------- shared with fastft.rl.cpo


def _check_decoder_only(trainer: object) -> None:
    if trainer.is_encoder_decoder:
        raise NotImplementedError(
            f"fastft.rl.{type(trainer).__name__} supports decoder-only (causal LM) models; this model is "
            f"encoder-decoder. Use trl.experimental's {type(trainer).__name__} for it."
        )


def _pair_hidden_states(trainer: object, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """(2B, T, H) backbone hidden states of the concatenated batch: ``model(...)`` without its head."""
    if trainer.aux_loss_enabled:
        raise NotImplementedError(
            f"fastft.rl.{type(trainer).__name__}: the model's config has output_router_logits=True, whose auxiliary "
            "loss transformers computes inside *ForCausalLM.forward, which fastft's head path does not call. Set "
            "model.config.output_router_logits = False (no router loss), or use trl.experimental's trainer."
        )
    return backbone_hidden_states(model, input_ids, attention_mask)


def _sequence_log_probs(token_log_probs: torch.Tensor, mask: torch.Tensor, average: bool) -> torch.Tensor:
    """TRL's ``get_batch_logps`` reduction: the sum (or mean) of each row's log-probs where ``mask`` is set."""
    total = (token_log_probs * mask).sum(-1)
    return total / mask.sum(-1) if average else total


@torch.no_grad()
def _mean_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The mean over the vocabulary of the (transformed) logits at each position of ``hidden`` (..., H), fp32.

    Linear without a softcap: mean_v (scale * (h @ W_v + b_v)) = scale * (h @ mean_v W_v + mean_v b_v), one
    (tokens, H) x (H,) product and one reduction of W (accumulated in fp32, no fp32 copy of W). With a softcap
    the logits are not linear in h: a no-grad chunked head pass computes them (``stats=True``).
    """
    head = output_linear(model)
    lm = _causal_lm(model)
    softcap, logit_scale = head_transform(lm.config, lm)
    weight, bias = head.weight, head.bias
    # A metric, computed in fp32 outside the trainer's mixed-precision autocast (the head pass runs inside it).
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        if softcap is not None:
            labels = torch.zeros(hidden.shape[:-1], dtype=torch.long, device=weight.device)  # every position live
            return head_log_probs(model, hidden, labels, stats=True).mean_logits
        mean_row = weight.mean(0, dtype=torch.float32)
        out = hidden.to(device=weight.device, dtype=torch.float32) @ mean_row
        if bias is not None:
            out = out + bias.mean(dtype=torch.float32)
        return out if logit_scale is None else out * logit_scale


# ------------------------------------------------------------------------------------------------- trainer


class ORPOTrainer(_TRLORPOTrainer):
    """TRL's ``ORPOTrainer`` (same arguments, :class:`ORPOConfig`, datasets) computing its loss without full logits.

    Only ``concatenated_forward`` differs: it runs the backbone and fastft's chunked log-prob head, so no
    (batch, seq, vocab) tensor is created or saved for backward; loss, gradients and logged metrics are TRL's (see
    the module docstring). Decoder-only models; encoder-decoder ones raise ``NotImplementedError``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _check_decoder_only(self)

    def concatenated_forward(
        self, model: nn.Module, batch: dict[str, list | torch.LongTensor]
    ) -> tuple[torch.Tensor, ...]:
        """(chosen_logps, rejected_logps, chosen_mean_logits, rejected_mean_logits, chosen_nll_loss), as TRL's.

        The logps are each sequence's average response log-prob; the mean logits are (B, T - 1) vocabulary means
        standing in for TRL's (B, T - 1, V) logits (their ``.mean()`` is TRL's metric).
        """
        cat = self.concatenated_inputs(
            batch, is_encoder_decoder=False, padding_value=self.padding_value, device=self.accelerator.device
        )
        n_chosen = batch["chosen_labels"].shape[0]
        input_ids, attention_mask = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
        # Targets, shifted (position t scores token t+1): the chosen NLL scores every attended token (prompt and
        # response), the odds ratio the labelled response tokens of both halves.
        nll_targets = input_ids.masked_fill(attention_mask == 0, -100)[:n_chosen, 1:]
        or_targets = cat["concatenated_labels"][:, 1:]
        or_mask = or_targets != -100
        # One pass serves both terms when every labelled chosen token is also an NLL target (TRL's tokenisation);
        # otherwise the chosen rows are scored again against their labels.
        rescore = bool((or_mask[:n_chosen] & (or_targets[:n_chosen] != nll_targets)).any())
        targets = torch.cat([nll_targets, or_targets[n_chosen:]])

        def compute(input_ids, attention_mask, targets, chosen_or_targets) -> tuple:
            # Backbone and head in one function: on an FSDP2-sharded model run_in_root runs it under the root
            # unit's all-gather (the head's weight is a shard outside it).
            hidden = _pair_hidden_states(self, model, input_ids, attention_mask)[:, :-1]
            token_log_probs = head_log_probs(model, hidden, targets).log_probs
            if rescore:
                chosen_or_scores = head_log_probs(model, hidden[:n_chosen], chosen_or_targets).log_probs
            else:
                chosen_or_scores = None
            return token_log_probs, chosen_or_scores, _mean_logits(model, hidden)

        with self.accelerator.autocast():  # what accelerate runs model.forward in under bf16/fp16 mixed precision
            token_log_probs, chosen_or_scores, mean_logits = run_in_root(
                model, compute, input_ids, attention_mask, targets, or_targets[:n_chosen]
            )
        chosen_nll_scores = token_log_probs[:n_chosen]
        if chosen_or_scores is None:
            chosen_or_scores = chosen_nll_scores
        chosen_nll_loss = -chosen_nll_scores.sum() / (nll_targets != -100).sum()  # nn.CrossEntropyLoss's mean
        all_logps = _sequence_log_probs(
            torch.cat([chosen_or_scores, token_log_probs[n_chosen:]]), or_mask, average=True
        )
        return (
            all_logps[:n_chosen],
            all_logps[n_chosen:],
            mean_logits[:n_chosen],
            mean_logits[n_chosen:],
            chosen_nll_loss,
        )


__all__ = ["ORPOConfig", "ORPOTrainer"]
