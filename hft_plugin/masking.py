"""The hot path: keep the frozen regions of fused tensors exactly where they are.

Whole tensors are frozen with ``requires_grad=False`` and cost nothing. A tensor that is only partly
frozen (a slice of ``qkv_proj``, some experts of a stacked expert tensor) keeps ``requires_grad``,
and its gradient is masked once per optimizer step: one ``torch._foreach_mul_`` over all masked
gradients together, from an optimizer step pre-hook, not an autograd hook per parameter per
micro-batch. Masking is idempotent, so a trainer may also call it before gradient clipping.

A zero gradient keeps an element still only if the optimizer is elementwise and applies no weight
decay to it (SGD, Adam, AdamW, Adafactor, ... with weight_decay=0). Otherwise (weight decay, or an
optimizer that mixes elements) :class:`FrozenRestore` puts the frozen elements back after each step.
"""

from __future__ import annotations

import torch

from .layouts.base import Box

# Optimizers whose update of an element with zero gradient and zero state is exactly zero when
# weight_decay is 0: masking alone keeps frozen elements bit-identical under them.
ELEMENTWISE_OPTIMIZERS = frozenset({
    "SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adafactor",
})


def region_mask(shape: tuple[int, ...], boxes: tuple[Box, ...], device, dtype=torch.bool) -> torch.Tensor:
    """A mask of ``shape`` that is 1 inside the union of ``boxes``."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    for box in boxes:
        index = [slice(None)] * len(shape)
        for dim, start, stop in box:
            index[dim] = slice(start, stop)
        mask[tuple(index)] = True
    return mask.to(dtype)


class GradientMask:
    """Zeroes the gradients of frozen regions, for all masked parameters in one fused call."""

    def __init__(self, params: list[torch.nn.Parameter], trainable_masks: list[torch.Tensor]):
        self.params = params
        # Stored in the parameter's dtype so the multiply is one fused kernel per dtype and device.
        self.masks = [m.to(p.dtype) for p, m in zip(params, trainable_masks)]
        self.applied = False  # reset after each optimizer step

    def apply(self) -> None:
        if self.applied:
            return
        grads, masks = [], []
        for param, mask in zip(self.params, self.masks):
            if param.grad is not None:
                grads.append(param.grad)
                masks.append(mask)
        if grads:
            torch._foreach_mul_(grads, masks)
        self.applied = True


class FrozenRestore:
    """Puts frozen elements back after an optimizer step, bit for bit."""

    def __init__(self, params: list[torch.nn.Parameter], trainable_masks: list[torch.Tensor]):
        self.params = params
        self.masks = [m.to(torch.bool) for m in trainable_masks]
        self.saved = [p.detach().clone() for p in params]

    @torch.no_grad()
    def apply(self) -> None:
        for param, mask, saved in zip(self.params, self.masks, self.saved):
            param.copy_(torch.where(mask, param, saved))


def needs_restore(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> bool:
    """True unless masking alone provably keeps frozen elements still under ``optimizer``."""
    if type(optimizer).__name__ not in ELEMENTWISE_OPTIMIZERS:
        return True
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        if any(id(p) in ids for p in group["params"]) and group.get("weight_decay", 0) not in (0, 0.0, None):
            return True
    return False
