"""What half fine-tuning needs under DeepSpeed ZeRO, for every adapter whose framework uses it.

ZeRO keeps gradients in flat, partitioned buffers, not in ``param.grad``, so the frozen blocks of a
partly trained (fused) tensor are zeroed by a gradient hook on the parameter, before ZeRO reduces
the gradient (:class:`ZeroGradientMasks`, through :meth:`~hft_plugin.freeze.HFTHandle.gradient_hook`:
the frozen blocks the handle finds once per tensor). Restoring frozen blocks after a step would need
ZeRO's fp32 master copy, so those tensors need an elementwise optimizer without weight decay:
:func:`check_zero_optimizer` refuses anything else, and an optimizer that owns frozen tensors.
"""

from __future__ import annotations

from typing import Any

from .errors import IntegrationError

# Optimizers under which a zero gradient with zero state moves nothing (when weight decay is 0),
# by the class names DeepSpeed builds from a config "optimizer" block.
ELEMENTWISE = frozenset({"Adam", "AdamW", "DeepSpeedCPUAdam", "FusedAdam", "SGD", "Adagrad", "DeepSpeedCPUAdagrad"})


class ZeroGradientMasks:
    """Gradient hooks that zero the frozen blocks of every partly trained tensor of ``handle``."""

    def __init__(self) -> None:
        self._hooks: list = []

    @property
    def installed(self) -> bool:
        return bool(self._hooks)

    def install(self, handle: Any) -> None:
        if self._hooks:
            return
        for name, param in handle.masked_parameters.items():
            self._hooks.append(param.register_hook(handle.gradient_hook(name)))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def check_zero_optimizer(engine_optimizer: Any, handle: Any) -> None:
    """Refuse a ZeRO optimizer that owns frozen tensors, or one under which masked tensors' frozen
    blocks could move (not elementwise, or weight decay on them).

    ``engine_optimizer`` is ``DeepSpeedEngine.optimizer`` (a ZeRO stage 1-3 optimizer); anything
    without ZeRO's parameter groups is left alone.

    Raises:
        IntegrationError: naming the problem and the setting that fixes it.
    """
    groups = getattr(engine_optimizer, "bit16_groups", None) or getattr(engine_optimizer, "fp16_groups", None)
    if groups is None:
        return
    trainable = {id(p) for p in handle.parameters()}
    frozen = [p for group in groups for p in group if id(p) not in trainable]
    if frozen:
        raise IntegrationError(
            f"DeepSpeed's optimizer owns {len(frozen)} frozen tensors: the model was handed to DeepSpeed before "
            "HFT froze it. Call enable_hft before trainer.train() on a fresh Trainer."
        )
    masked = {id(p) for p in handle.masked_parameters.values()}
    if not masked:
        return
    basic = getattr(engine_optimizer, "optimizer", None)
    name = type(basic).__name__
    bad = [i for i, group in enumerate(groups) if any(id(p) in masked for p in group)
           and (basic.param_groups[i].get("weight_decay") or 0) != 0]
    if name not in ELEMENTWISE or bad:
        raise IntegrationError(
            f"This model has fused tensors trained in part (e.g. {next(iter(handle.masked_parameters))}); "
            f"under DeepSpeed their frozen slices stay still only with an elementwise optimizer and "
            f"weight_decay=0, but the optimizer is {name} with weight decay "
            f"{[basic.param_groups[i].get('weight_decay') for i in bad] or 0}. Set weight_decay=0 (in "
            "TrainingArguments and in the DeepSpeed optimizer block), or use strategy='layer' (no masks)."
        )
