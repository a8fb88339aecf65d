"""The ``mask`` mechanism: the optimizer owns the tensor whole, and its frozen blocks' gradients are
zeroed once per step.

The fallback for every partly trained tensor that no region mechanism takes (see
:mod:`hft_plugin.mechanisms`): tensors already sharded, or whose gradients live in flat partitions
(DeepSpeed ZeRO), shared by several modules, in modules HFT does not compute itself.

Whole tensors are frozen with ``requires_grad=False`` and cost nothing. A tensor that is only partly
frozen keeps ``requires_grad``, and its gradient is masked once per optimizer step: one
``torch._foreach_zero_`` over views of the frozen blocks of all masked gradients together, from an
optimizer step pre-hook, not an autograd hook per parameter per micro-batch. Masking is idempotent
and keeps no state, so a trainer may also call it before gradient clipping, and a skipped step (a
gradient scaler's overflow) changes nothing.

A zero gradient keeps an element still only if the optimizer is elementwise and applies no weight
decay to it (SGD, Adam, AdamW, Adafactor, ... with weight_decay=0). Otherwise (weight decay, or an
optimizer that mixes elements) :class:`FrozenRestore` puts the frozen elements back after each step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, Union

import torch

from ..boxes import Box, frozen_slices, frozen_slices_of_mask, to_mask

if TYPE_CHECKING:
    from . import Candidate

NAME = "mask"

# Optimizers whose update of an element with zero gradient and zero state is exactly zero when
# weight_decay is 0: masking alone keeps frozen elements bit-identical under them.
ELEMENTWISE_OPTIMIZERS = frozenset({
    "SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adafactor",
})


def matches(tensor: "Candidate") -> bool:
    """The mask takes every tensor: it is last in the dispatch."""
    return True


def why_not(tensor: "Candidate") -> str | None:
    return None


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2's parameters and gradients), sharing its storage; any
    other tensor as it is. The frozen slices of a sharded tensor are found on the local shard
    (:func:`hft_plugin.shards.local_part`)."""
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


class Frozen:
    """Where one tensor is frozen: boxes of slices (cheap views), or its dense mask as a fallback
    for a region too scattered for boxes. Found once per tensor and shared by everything that zeroes
    its frozen gradient or restores its frozen values: :class:`GradientMask` (in place, before a
    step), :meth:`zeroed` (in a gradient hook), :class:`FrozenRestore`.

    :meth:`of_boxes` finds the slices from the trainable boxes alone and builds a dense mask only for
    a scattered region; ``Frozen(trainable)`` reads a dense boolean mask that is already there.

        >>> frozen = Frozen.of_boxes((4, 2), (((0, 0, 1),),))  # row 0 trains
        >>> frozen.slices, frozen.dense("cpu", torch.float32)
        ([(slice(1, 4, None), slice(0, 2, None))], None)

    Args:
        trainable: the tensor's boolean trainable mask (this rank's part of it for a sharded tensor).
    """

    def __init__(self, trainable: torch.Tensor):
        self.shape = tuple(trainable.shape)
        self.slices = frozen_slices_of_mask(trainable.to("cpu", torch.bool))  # found on the host: no device syncs
        self._source = trainable if self.slices is None else None  # kept only for a scattered region
        self._dense: dict[tuple, torch.Tensor] = {}

    @classmethod
    def of_boxes(cls, shape: Sequence[int], boxes: Sequence[Box]) -> "Frozen":
        """Where a tensor of ``shape`` whose ``boxes`` train is frozen; no dense mask is built unless
        the region is too scattered for slices."""
        frozen = cls.__new__(cls)
        frozen.shape = tuple(shape)
        frozen.slices = frozen_slices(shape, boxes)
        frozen._source = (tuple(shape), tuple(boxes))
        frozen._dense = {}
        return frozen

    def dense(self, device, dtype) -> torch.Tensor | None:
        """The trainable mask as ``dtype`` on ``device`` where there are no slices, else None."""
        if self.slices is not None:
            return None
        key = (str(device), dtype)
        if key not in self._dense:
            source = self._source
            self._dense[key] = (source.to(device, dtype) if isinstance(source, torch.Tensor)
                                else to_mask(*source, device, dtype))
        return self._dense[key]

    def zeroed(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` with the frozen elements zeroed, as a new tensor: for a tensor hook, which must
        not write into the gradient autograd hands it (DeepSpeed ZeRO reduces it into flat
        partitions next, so ``.grad`` is never there to mask)."""
        if self.slices is None:
            return grad * self.dense(grad.device, grad.dtype)
        grad = grad.clone()
        torch._foreach_zero_([grad[box] for box in self.slices])
        return grad


def _frozen(trainable: Union[torch.Tensor, Frozen]) -> Frozen:
    return trainable if isinstance(trainable, Frozen) else Frozen(trainable)


class _Regions:
    """The frozen regions of several tensors: views of their slices, or dense masks."""

    def __init__(self, params: list[torch.nn.Parameter], trainable: Sequence[Union[torch.Tensor, Frozen]]):
        self.params = params
        self.frozen = [_frozen(t) for t in trainable]
        self.dense = [f.dense(p.device, p.dtype) for p, f in zip(params, self.frozen)]

    def views(self, tensors: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """Views of the frozen boxes of ``tensors`` (one per parameter; None skipped)."""
        views = []
        for tensor, frozen in zip(tensors, self.frozen):
            if tensor is None or not frozen.slices:
                continue
            tensor = local_tensor(tensor)
            if tuple(tensor.shape) != frozen.shape:  # e.g. a flattened shard: slicing it would hit the wrong elements
                raise RuntimeError(f"hft_plugin: a masked tensor has shape {tuple(tensor.shape)}, its mask {frozen.shape}.")
            views.extend(tensor[box] for box in frozen.slices)
        return views


class GradientMask:
    """Zeroes the gradients of frozen regions, for all masked parameters in one fused call.

    The frozen regions are blocks (rows of ``qkv_proj``, experts of an expert stack), so the
    gradient is not multiplied by a dense mask: the frozen blocks are zeroed through views, with
    one ``torch._foreach_zero_`` over all of them. That writes only the frozen elements, reads
    nothing, keeps no mask tensor per parameter, and leaves exact zeros even where a gradient was
    inf or NaN. A region too scattered for blocks falls back to a dense mask multiply.

    ``trainable``: per parameter, its boolean trainable mask or its :class:`Frozen`.

        >>> from hft_plugin.boxes import to_mask
        >>> w = torch.nn.Parameter(torch.ones(4, 2))
        >>> w.grad = torch.ones(4, 2)
        >>> GradientMask([w], [to_mask((4, 2), (((0, 0, 1),),), "cpu")]).apply()
        >>> w.grad[:, 0].tolist()
        [1.0, 0.0, 0.0, 0.0]
    """

    def __init__(self, params: list[torch.nn.Parameter], trainable: Sequence[Union[torch.Tensor, Frozen]]):
        self.params = params
        self._regions = _Regions(params, trainable)

    def apply(self) -> None:
        grads = [p.grad for p in self.params]
        views = self._regions.views(grads)
        if views:
            torch._foreach_zero_(views)
        dense = [(local_tensor(g), m) for g, m in zip(grads, self._regions.dense) if g is not None and m is not None]
        if dense:
            torch._foreach_mul_([g for g, _ in dense], [m for _, m in dense])


class FrozenRestore:
    """Puts frozen elements back after an optimizer step, bit for bit.

    Keeps a copy of the frozen regions only (not of whole tensors) and copies them back with one
    ``torch._foreach_copy_``.
    """

    def __init__(self, params: list[torch.nn.Parameter], trainable: Sequence[Union[torch.Tensor, Frozen]]):
        self.params = params
        self._regions = _Regions(params, trainable)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Take the parameters' current values as the frozen ones (after loading weights)."""
        self._saved = [v.clone() for v in self._regions.views([p.detach() for p in self.params])]
        self._dense_saved = [(local_tensor(p.detach()), m.to(torch.bool), local_tensor(p.detach()).clone())
                             for p, m in zip(self.params, self._regions.dense) if m is not None]

    @torch.no_grad()
    def apply(self) -> None:
        if self._saved:
            torch._foreach_copy_(self._regions.views([p.detach() for p in self.params]), self._saved)
        for param, mask, saved in self._dense_saved:
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
