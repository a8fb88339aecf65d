"""A selection against a real model: can HFT train the model as it is, does the selection fit it,
would anything train under the user's own ``requires_grad`` flags, and what actually trains.

:func:`hft_plugin.select_half` refuses a model with :func:`check_model`; applying a selection
(:func:`hft_plugin.apply_selection`) checks :func:`check_fits` and :func:`check_trains_something`
first; the summary a trainer logs when training starts counts :func:`applied_counts`. Each check
changes nothing.

    >>> from hft_plugin.testing import tiny_model
    >>> check_model(tiny_model("llama")).__class__.__name__
    'LlamaForCausalLM'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from torch import nn

from .errors import NothingToTrainError, SelectionMismatchError, UnsupportedModelError
from .layouts.base import fingerprint_shapes, gc_paused, is_peft, param_shape, unwrap_model

if TYPE_CHECKING:
    from .selection import Selection

__all__ = ["check_model", "check_fits", "check_trains_something", "applied_counts"]


def check_model(model: Any) -> nn.Module:
    """Refuse, with a clear message, a model HFT cannot train as it is. Changes nothing.

    Refused: a non-module, a PEFT-wrapped model, and weights an optimizer cannot update in place:
    integer or packed tensors (bitsandbytes 4/8-bit, GPTQ, AWQ, HQQ, GGUF blocks kept packed...),
    fp8 tensors, quantized tensor subclasses (torchao, quanto), and any model a quantizer other
    than GGUF's manages. Accepted: a model transformers loaded from a GGUF file and de-quantized
    to ordinary float tensors (it keeps ``hf_quantizer``, ``is_quantized`` and
    ``config.quantization_config``, but its weights are plain fp32/fp16/bf16).

    Raises:
        UnsupportedModelError: the message says which case it is and what to do.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"select_half needs a torch.nn.Module, got {type(model).__name__}.")
    model = unwrap_model(model)
    if is_peft(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} is PEFT-wrapped. HFT trains half of the original weights, not "
            "adapters: pass the base model, or merge the adapters first (model.merge_and_unload())."
        )
    from .quantized import quantization_problem

    problem = quantization_problem(model)
    if problem:
        raise UnsupportedModelError(problem)
    return model


def check_fits(model: nn.Module, selection: Selection) -> None:
    """Raise SelectionMismatchError unless ``selection`` was made for a model of ``model``'s
    structure: the same parameter names and shapes and, for fused tensors, the same split (a
    4-head GPT-NeoX selection does not fit a 2-head model with equal shapes). Changes nothing."""
    model = unwrap_model(model)
    shapes = {n: param_shape(p) for n, p in model.named_parameters()}
    if shapes != selection.layout.shapes:
        diff = sorted(set(shapes.items()) ^ set(selection.layout.shapes.items()))
        raise SelectionMismatchError(
            f"This selection was made for another model (fingerprint {selection.fingerprint}, this model "
            f"{fingerprint_shapes(shapes)}); first difference: {diff[0][0] if diff else '?'}. "
            "Call select_half on this model."
        )
    wanted = selection.layout.splits()
    if not wanted:
        return  # nothing is split: names and shapes decide everything
    from .selection import read_layout  # here: selection.py imports this module

    with gc_paused():
        here = read_layout(model).splits()
    if here != wanted:
        name = next((n for n in sorted(set(here) | set(wanted)) if here.get(n) != wanted.get(n)), "?")
        raise SelectionMismatchError(
            f"This selection was made for another model: {name!r} has the same shape but is split into parts "
            "differently here (the config divides it otherwise, e.g. another number of attention heads, "
            "key/value heads or experts). Call select_half on this model."
        )


def applied_counts(selection: Selection, requires_grad: Mapping[str, bool] | nn.Module) -> dict[str, Any]:
    """What actually trains once ``selection`` is applied: :meth:`Selection.stats`'s numbers counted
    over the parameters whose ``requires_grad`` is True, so tensors the user had frozen, which HFT
    leaves frozen, count as frozen.

    Args:
        selection: the selection.
        requires_grad: parameter name -> flag after applying (or the model to read them from).
            Partly trained (fused) tensors keep ``requires_grad=True``; their frozen regions are
            not counted.

    Returns:
        The keys of :meth:`Selection.stats` (``trainable_params``, ``layer_trainable_params``,
        ``outside_trainable_params``, ``trainable_ratio``, ``overall_ratio``, ``roles``, ...), in
        elements, plus ``frozen_by_user``: the parameters the plan trains (whole or in part) that
        stay frozen.

    Example:
        >>> from hft_plugin import select_half
        >>> from hft_plugin.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> selection = select_half(model)
        >>> _ = model.lm_head.requires_grad_(False)  # frozen by the user: HFT keeps it frozen
        >>> counts = applied_counts(selection, model)
        >>> counts["outside_trainable_params"] < selection.stats()["outside_trainable_params"]
        True
    """
    if isinstance(requires_grad, nn.Module):
        requires_grad = _flags(requires_grad)
    stats = selection.stats()
    plan = selection.plan()
    frozen_plan = set(plan.frozen)
    per_role: dict[str, list[int]] = {r: [0, v["total"]] for r, v in stats["roles"].items()}
    for unit, trains in selection.units():
        if trains:
            per_role[unit.role][0] += sum(p.numel for p in unit.parts if requires_grad.get(p.param, False))
    layer_trainable = sum(c[0] for c in per_role.values())
    outside_trainable = sum(selection.layout.numel(n) for n in selection.layout.outside
                            if n not in frozen_plan and requires_grad.get(n, False))
    layer_total, total = stats["layer_params"], stats["total_params"]
    frozen_by_user = sorted(n for n in (*plan.trainable, *plan.partial) if not requires_grad.get(n, False))
    roles = {r: {"trainable": c[0], "total": c[1], "ratio": c[0] / c[1] if c[1] else 0.0} for r, c in per_role.items()}
    return {
        **stats,
        "trainable_ratio": layer_trainable / layer_total if layer_total else 0.0,
        "layer_trainable_params": layer_trainable,
        "outside_trainable_params": outside_trainable,
        "trainable_params": layer_trainable + outside_trainable,
        "overall_ratio": (layer_trainable + outside_trainable) / total if total else 0.0,
        "roles": roles,
        "groups": roles,  # deprecated: the former name of "roles"
        "frozen_by_user": frozen_by_user,
    }


def _flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in unwrap_model(model).named_parameters()}


def check_trains_something(selection: Selection, requires_grad: Mapping[str, bool] | nn.Module) -> None:
    """Raise NothingToTrainError if applying ``selection`` would leave nothing to train, because
    the parameters it trains are all frozen already. ``requires_grad``: the flags the user left
    (before HFT), by parameter name, or the model. Changes nothing."""
    if isinstance(requires_grad, nn.Module):
        requires_grad = _flags(requires_grad)
    plan = selection.plan()
    wanted = [*plan.trainable, *plan.partial]
    if any(requires_grad.get(n, False) for n in wanted):
        return
    c = selection.config
    if not any(requires_grad.values()):
        what = f"every one of the model's {len(requires_grad)} parameters has requires_grad=False"
    else:
        what = (f"the {len(wanted)} parameters round {c.round} trains (e.g. {wanted[0]!r}) all have requires_grad="
                f"False; only parameters HFT freezes in this round are left trainable")
    raise NothingToTrainError(
        f"Nothing would train: {what}. HFT freezes half of what you leave trainable and never unfreezes what you "
        "froze. Unfreeze the model before enabling HFT (model.requires_grad_(True)), or freeze less by hand."
    )
