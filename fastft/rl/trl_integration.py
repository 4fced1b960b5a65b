"""TRL's trainers use fastft's log-prob head for fastft models, and only for them.

TRL 1.16's SFT, DPO, KTO, GRPO and RLOO trainers install a fused LM head on the model instance
(``trl.trainer.utils.add_fused_lm_head``): in training they run the backbone and score the tokens with
``trl.trainer.utils._ChunkedLogProbFunction.apply(hidden, weight, bias, labels, temperature, chunk_size,
softcap, logit_scale, outputs)``, never calling the model's own head. That call is the one seam through which
fastft's kernel can serve every trainer at once. This module installs two small hooks there, without touching
TRL's source:

1. ``_ChunkedLogProbFunction`` in ``trl.trainer.utils`` is replaced by a dispatcher with the same ``apply``. When
   the weight it is given is the output head of a fastft model (fastft's causal LM tags its head weight
   whenever ``get_output_embeddings()`` is called, which TRL does right before this call), it runs
   :func:`fastft.kernels.logprob_head.linear_log_probs`; for every other weight, and for inputs fastft does not
   take (a head weight in another dtype than the hidden states, as ``cast_lm_head_to_fp32`` gives; sharded
   DTensor weights), it calls TRL's own function with the same arguments, so other models behave exactly as
   before. :data:`calls` counts both routes.
2. ``create_model_from_path`` (in ``trl.trainer.utils`` and every TRL module that imported it): when a trainer
   reloads a reference model from the path a fastft model was loaded from (DPO, KTO or GRPO without PEFT and
   without ``ref_model``), the reloaded model is patched with :func:`fastft.patch` too, so the reference pass
   is fast as well. Reference passes of PEFT models (adapter disabled, or TRL's "ref" adapter) run on the same
   fastft-patched model and need nothing here.

The hooks are installed the first time a model is patched (:func:`install`): at once if TRL's utilities are
already imported, otherwise right after Python imports them (a ``sys.meta_path`` finder that removes itself).
Importing fastft alone changes nothing in TRL.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import inspect
import logging
import sys
import threading
from collections import Counter

import torch

logger = logging.getLogger("fastft")

_UTILS = "trl.trainer.utils"
# The arguments TRL 1.16 passes, in order; another TRL whose function takes others is left alone.
_ARGUMENTS = ("hidden", "weight", "bias", "targets", "temperature", "chunk_size", "final_logit_softcapping",
              "logit_scale", "outputs")  # fmt: skip
_STATS = ("log_sum_sq_probs", "mean_logits", "is_top1")

calls: Counter[str] = Counter()
"""How many chunked log-prob calls ran through fastft's kernel (``"fastft"``) or TRL's own (``"trl"``)."""

_lock = threading.Lock()
_reference_sources: dict[str, bool] = {}  # path a fastft model was loaded from -> its fused_loss option


def is_fastft_head(weight: object) -> bool:
    """Whether ``weight`` is the output-head weight of a fastft-patched causal LM."""
    return bool(getattr(weight, "_fastft_head", False))


class _Dispatcher:
    """Stands in for TRL's ``_ChunkedLogProbFunction``: fastft's kernel for fastft heads, TRL's otherwise."""

    def __init__(self, original: type) -> None:
        self.original = original
        params = list(inspect.signature(original.forward).parameters)[1:]  # without ctx
        self.supported = tuple(params) == _ARGUMENTS
        if not self.supported:
            logger.warning(
                "fastft: this TRL's chunked log-prob function takes %s, not the arguments fastft knows; TRL's "
                "trainers keep TRL's own head (correct, not faster). Please report your TRL version to fastft.",
                params,
            )

    def apply(self, *args, **kwargs):
        if self.supported:
            bound = dict(zip(_ARGUMENTS, args))
            bound.update(kwargs)
            if self._fastft_can_run(bound):
                calls["fastft"] += 1
                return _run_fastft(**bound)
        calls["trl"] += 1
        return self.original.apply(*args, **kwargs)

    @staticmethod
    def _fastft_can_run(bound: dict) -> bool:
        hidden, weight, bias = bound.get("hidden"), bound.get("weight"), bound.get("bias")
        if not is_fastft_head(weight) or not torch.is_tensor(hidden):
            return False
        dtypes_match = hidden.dtype == weight.dtype and (bias is None or bias.dtype == weight.dtype)
        autocast = torch.is_autocast_enabled(hidden.device.type)
        return (dtypes_match or autocast) and type(weight) in (torch.Tensor, torch.nn.Parameter)


def _run_fastft(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale,
                outputs=("log_probs",)):  # fmt: skip
    """TRL's call, answered by :func:`linear_log_probs` (chunk_size is TRL's tiling; fastft picks its own)."""
    from fastft.kernels.logprob_head import linear_log_probs

    result = linear_log_probs(
        hidden,
        weight,
        targets,
        bias,
        temperature=float(temperature),
        softcap=final_logit_softcapping,
        logit_scale=None if logit_scale == 1.0 else float(logit_scale),
        entropy="entropy" in outputs,
        stats=any(name in outputs for name in _STATS),
    )
    return tuple(
        getattr(result, name) if name == "log_probs" or name in outputs else None
        for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    )


def remember_source(model: torch.nn.Module, fused_loss: bool) -> None:
    """Record the path ``model`` was loaded from, so a TRL reference model reloaded from it gets patched."""
    config = getattr(model, "config", None)
    source = getattr(config, "_name_or_path", "") or ""
    if source:
        _reference_sources[source] = fused_loss


def _wrap_create_model_from_path(original):
    def create_model_from_path(model_id, *args, **kwargs):
        model = original(model_id, *args, **kwargs)
        if isinstance(model_id, str) and model_id in _reference_sources:
            from fastft.models.patch import patch

            patch(model, fused_loss=_reference_sources[model_id])
            logger.info("fastft: patched the model TRL loaded from %s (a reference model of a fastft model)", model_id)
        return model

    create_model_from_path.__wrapped__ = original
    create_model_from_path.__doc__ = original.__doc__
    create_model_from_path._fastft_hook = True
    return create_model_from_path


def _install_into(utils) -> None:
    """Install both hooks into an imported ``trl.trainer.utils`` (idempotent)."""
    original_fn = getattr(utils, "_ChunkedLogProbFunction", None)
    if original_fn is not None and not isinstance(original_fn, _Dispatcher):
        utils._ChunkedLogProbFunction = _Dispatcher(original_fn)
    original_create = getattr(utils, "create_model_from_path", None)
    if original_create is None or getattr(original_create, "_fastft_hook", False):
        return
    hooked = _wrap_create_model_from_path(original_create)
    utils.create_model_from_path = hooked
    # Trainer modules imported before now hold their own reference to the original function.
    for name, module in list(sys.modules.items()):
        if name.startswith("trl.") and getattr(module, "create_model_from_path", None) is original_create:
            module.create_model_from_path = hooked


class _InstallAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when ``trl.trainer.utils`` is imported, installs the hooks right after it runs."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _UTILS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            _install_into(module)

        spec.loader.exec_module = exec_module
        _remove_finder()
        return spec


_finder: _InstallAfterImport | None = None


def _remove_finder() -> None:
    global _finder
    if _finder is not None and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    _finder = None


def install() -> None:
    """Install the TRL hooks (see the module docstring); cheap and idempotent, called by :func:`fastft.patch`."""
    global _finder
    with _lock:
        utils = sys.modules.get(_UTILS)
        if utils is not None:
            _install_into(utils)
        elif _finder is None:
            _finder = _InstallAfterImport()
            sys.meta_path.insert(0, _finder)
