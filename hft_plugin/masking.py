"""The hot path: keep the frozen regions of fused tensors exactly where they are.

Whole tensors are frozen with ``requires_grad=False`` and cost nothing. A tensor that is only partly
frozen (a slice of ``qkv_proj``, some experts of a stacked expert tensor) keeps ``requires_grad``,
and its gradient is masked once per optimizer step: one ``torch._foreach_zero_`` over views of the
frozen blocks of all masked gradients together, from an optimizer step pre-hook, not an autograd
hook per parameter per micro-batch. Masking is idempotent and keeps no state, so a trainer may also
call it before gradient clipping, and a skipped step (a gradient scaler's overflow) changes nothing.

A zero gradient keeps an element still only if the optimizer is elementwise and applies no weight
decay to it (SGD, Adam, AdamW, Adafactor, ... with weight_decay=0). Otherwise (weight decay, or an
optimizer that mixes elements) :class:`FrozenRestore` puts the frozen elements back after each step.
"""

from __future__ import annotations

import itertools
import math

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


# Above this many boxes for one tensor (a scattered, not block-shaped region) a dense mask is cheaper.
_MAX_BOXES = 4096


def frozen_boxes(trainable: torch.Tensor) -> list[tuple[slice, ...]] | None:
    """The frozen (False) elements of a boolean mask as a few boxes of slices, or None when the
    region is too scattered for boxes to pay off.

    Cuts each dimension where consecutive slices of the mask differ; the mask is constant on every
    cell between cuts, so the frozen cells (then merged along dimension 0) cover exactly the frozen
    elements.

        >>> mask = region_mask((6, 4), (((0, 0, 2),),), "cpu")  # rows 0-1 train
        >>> frozen_boxes(mask)
        [(slice(2, 6, None), slice(0, 4, None))]
    """
    cuts = []
    for dim, size in enumerate(trainable.shape):
        if size <= 1:
            cuts.append([0, size])
            continue
        changed = trainable.narrow(dim, 1, size - 1) != trainable.narrow(dim, 0, size - 1)
        others = tuple(d for d in range(trainable.dim()) if d != dim)
        if others:
            changed = changed.any(dim=others)
        cuts.append([0, *(torch.nonzero(changed).flatten() + 1).tolist(), size])
    if math.prod(len(c) - 1 for c in cuts) > _MAX_BOXES:
        return None
    # Frozen cells, merged into runs along dimension 0 where the other dimensions' ranges agree.
    runs: dict[tuple[tuple[int, int], ...], list[slice]] = {}  # slices are unhashable before 3.12
    for cell in itertools.product(*(range(len(c) - 1) for c in cuts)):
        box = tuple(slice(cuts[d][i], cuts[d][i + 1]) for d, i in enumerate(cell))
        if trainable[tuple(s.start for s in box)]:
            continue
        column = runs.setdefault(tuple((s.start, s.stop) for s in box[1:]), [])
        if column and column[-1].stop == box[0].start:
            column[-1] = slice(column[-1].start, box[0].stop)
        else:
            column.append(box[0])
    return [(run, *(slice(a, b) for a, b in rest)) for rest, column in runs.items() for run in column]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2's parameters and gradients), sharing its storage; any
    other tensor as it is. Masks of sharded tensors are built for the local shard
    (:func:`hft_plugin.shards.local_trainable_mask`)."""
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


class _Regions:
    """Where each tensor is frozen: boxes of slices (cheap views), or a dense mask as a fallback."""

    def __init__(self, params: list[torch.nn.Parameter], trainable_masks: list[torch.Tensor]):
        self.params = params
        self.shapes = [tuple(m.shape) for m in trainable_masks]
        self.boxes: list[list[tuple[slice, ...]] | None] = []
        self.dense: list[torch.Tensor | None] = []
        for param, mask in zip(params, trainable_masks):
            boxes = frozen_boxes(mask.to("cpu", torch.bool))  # found once, on the host: no device syncs
            self.boxes.append(boxes)
            self.dense.append(mask.to(param.device, param.dtype) if boxes is None else None)

    def views(self, tensors: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """Views of the frozen boxes of ``tensors`` (one per parameter; None skipped)."""
        views = []
        for tensor, boxes, shape in zip(tensors, self.boxes, self.shapes):
            if tensor is None or not boxes:
                continue
            tensor = local_tensor(tensor)
            if tuple(tensor.shape) != shape:  # e.g. a flattened shard: slicing it would hit the wrong elements
                raise RuntimeError(f"hft_plugin: a masked tensor has shape {tuple(tensor.shape)}, its mask {shape}.")
            views.extend(tensor[box] for box in boxes)
        return views


class GradientMask:
    """Zeroes the gradients of frozen regions, for all masked parameters in one fused call.

    The frozen regions are blocks (rows of ``qkv_proj``, experts of an expert stack), so the
    gradient is not multiplied by a dense mask: the frozen blocks are zeroed through views, with
    one ``torch._foreach_zero_`` over all of them. That writes only the frozen elements, reads
    nothing, keeps no mask tensor per parameter, and leaves exact zeros even where a gradient was
    inf or NaN. A region too scattered for blocks falls back to a dense mask multiply.

        >>> w = torch.nn.Parameter(torch.ones(4, 2))
        >>> w.grad = torch.ones(4, 2)
        >>> GradientMask([w], [region_mask((4, 2), (((0, 0, 1),),), "cpu")]).apply()
        >>> w.grad[:, 0].tolist()
        [1.0, 0.0, 0.0, 0.0]
    """

    def __init__(self, params: list[torch.nn.Parameter], trainable_masks: list[torch.Tensor]):
        self.params = params
        self._regions = _Regions(params, trainable_masks)

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

    def __init__(self, params: list[torch.nn.Parameter], trainable_masks: list[torch.Tensor]):
        self.params = params
        self._regions = _Regions(params, trainable_masks)
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
