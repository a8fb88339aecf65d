"""Boxes: how a layout names part of a tensor, and everything computed from them.

A *box* fixes index ranges along some dimensions of a tensor and takes the others whole:
``((dim, start, stop), ...)``. A partly trained tensor's trainable region is a union of boxes (the
q and k rows of a fused ``qkv_proj``; one expert's gate half of a stacked ``gate_up_proj``). Every
module that turns boxes into sizes, indexes, ranges, text, masks or the slices of the frozen part does
it here, so they all agree.

    >>> shape, boxes = (6, 4), (((0, 0, 2),), ((0, 4, 6), (1, 0, 2)))
    >>> [numel(shape, box) for box in boxes]
    [8, 4]
    >>> index(shape, boxes[1])
    (slice(4, 6, None), slice(0, 2, None))
    >>> describe(shape, boxes)
    '[0:2, :] + [4:6, 0:2] of (6, 4)'
    >>> int(to_mask(shape, boxes, "cpu").sum())
    12
"""

from __future__ import annotations

import bisect
import itertools
import math
from typing import Sequence

import torch

# A box: ((dim, start, stop), ...); dimensions not named are taken whole.
Box = tuple[tuple[int, int, int], ...]


def normalise(box: Box, shape: Sequence[int]) -> Box:
    """``box`` without the constraints that span their whole dimension.

        >>> normalise(((0, 0, 6), (1, 1, 2)), (6, 4))
        ((1, 1, 2),)
    """
    return tuple(c for c in box if not (c[1] <= 0 and c[2] >= shape[c[0]]))


def numel(shape: Sequence[int], box: Box) -> int:
    """How many elements ``box`` holds in a tensor of ``shape``.

        >>> numel((8, 16, 4), ((0, 2, 3), (1, 0, 8)))
        32
    """
    sizes = list(shape)
    for dim, start, stop in box:
        sizes[dim] = stop - start
    return math.prod(sizes)


def span(box: Box, dim: int, shape: Sequence[int]) -> tuple[int, int]:
    """The (start, stop) of ``box`` along ``dim``: its constraint there, or the whole dimension.

        >>> span(((1, 2, 3),), 0, (6, 4)), span(((1, 2, 3),), 1, (6, 4))
        ((0, 6), (2, 3))
    """
    for d, start, stop in box:
        if d == dim:
            return start, stop
    return 0, shape[dim]


def bounds(shape: Sequence[int], box: Box) -> tuple[tuple[int, int], ...]:
    """The (start, stop) of ``box`` along every dimension.

        >>> bounds((4, 6, 8), ((0, 2, 3), (2, 4, 8)))
        ((2, 3), (0, 6), (4, 8))
    """
    return tuple(span(box, dim, shape) for dim in range(len(shape)))


def index(shape: Sequence[int], box: Box, squeeze_leading: bool = False) -> tuple:
    """The index of ``box`` into a tensor of ``shape`` (``tensor[index(...)]`` is a view); with
    ``squeeze_leading``, a box that fixes dimension 0 to one index (one expert of a stack) indexes
    it with an int.

        >>> index((4, 6, 8), ((0, 2, 3), (1, 0, 3)), squeeze_leading=True)
        (2, slice(0, 3, None), slice(None, None, None))
    """
    found: list = [slice(None)] * len(shape)
    for dim, start, stop in box:
        found[dim] = slice(start, stop)
    if squeeze_leading and found[0] != slice(None) and found[0].stop - found[0].start == 1:
        found[0] = found[0].start
    return tuple(found)


def fixes_one(box: Box, dim: int = 0) -> bool:
    """Whether ``box`` fixes dimension ``dim`` to a single index (one expert of a stack).

        >>> fixes_one(((0, 3, 4), (1, 0, 8))), fixes_one(((1, 0, 8),))
        (True, False)
    """
    return any(d == dim and stop - start == 1 for d, start, stop in box)


def covers(boxes: Sequence[Box], shape: Sequence[int]) -> bool:
    """Whether the union of ``boxes`` is the whole of a tensor of ``shape``.

        >>> covers([((0, 0, 2),), ((0, 2, 4), (1, 0, 1)), ((0, 2, 4), (1, 1, 3))], (4, 3))
        True
        >>> covers([((0, 0, 2),)], (4, 3))
        False
    """
    if any(not box for box in boxes):
        return True
    if not boxes:
        return False
    dim = min(d for box in boxes for d, _, _ in box)
    cuts = sorted({0, shape[dim], *(x for box in boxes for x in span(box, dim, shape))})
    for start, stop in zip(cuts, cuts[1:]):
        over = [tuple(c for c in box if c[0] != dim) for box in boxes
                if span(box, dim, shape)[0] <= start and stop <= span(box, dim, shape)[1]]
        if not covers(over, shape):
            return False
    return True


def ranges(shape: Sequence[int], boxes: Sequence[Box], dim: int = 0) -> list[tuple[int, int]] | None:
    """The union of ``boxes`` as sorted, disjoint ranges along ``dim``, or None when it is not a
    union of whole slices of that dimension.

        >>> ranges((6, 4), [((0, 0, 2),), ((0, 4, 6),)])
        [(0, 2), (4, 6)]
        >>> ranges((6, 4), [((0, 0, 2), (1, 0, 2)), ((0, 0, 2), (1, 2, 4))])  # two halves: whole rows
        [(0, 2)]
        >>> ranges((4, 6), [((1, 0, 2),)]) is None  # columns
        True
        >>> ranges((4, 6), [((1, 0, 2),)], dim=1)
        [(0, 2)]
    """
    boxes = [normalise(box, shape) for box in boxes]
    cuts = sorted({0, shape[dim], *(x for box in boxes for x in span(box, dim, shape))})
    found: list[tuple[int, int]] = []
    for start, stop in zip(cuts, cuts[1:]):
        over = [tuple(c for c in box if c[0] != dim) for box in boxes
                if span(box, dim, shape)[0] <= start and stop <= span(box, dim, shape)[1]]
        if not over:
            continue
        if not covers(over, shape):
            return None
        if found and found[-1][1] == start:
            found[-1] = (found[-1][0], stop)
        else:
            found.append((start, stop))
    return found


def describe(shape: Sequence[int], boxes: Sequence[Box]) -> str:
    """The region in index notation, e.g. ``[:, 0:64] of (64, 192)``; past four boxes, a count.

        >>> describe((8, 4), [((1, 0, 2),)])
        '[:, 0:2] of (8, 4)'
    """
    parts = []
    for box in boxes:
        shown = [":"] * len(shape)
        for dim, start, stop in box:
            shown[dim] = f"{start}:{stop}"
        parts.append(f"[{', '.join(shown)}]")
    text = " + ".join(parts[:4]) + (f" + {len(parts) - 4} more" if len(parts) > 4 else "")
    return f"{text} of {tuple(shape)}"


def to_mask(shape: Sequence[int], boxes: Sequence[Box], device, dtype=torch.bool) -> torch.Tensor:
    """A mask of ``shape`` that is 1 inside the union of ``boxes``.

    Dense: one element per element of the tensor. To zero or restore a tensor's frozen part, take
    :func:`frozen_slices` instead, which needs no mask for a block-shaped region.
    """
    mask = torch.zeros(tuple(shape), dtype=torch.bool, device=device)
    for box in boxes:
        mask[index(shape, box)] = True
    return mask.to(dtype)


# Above this many boxes for one tensor (a scattered, not block-shaped region) a dense mask is cheaper.
MAX_FROZEN_SLICES = 4096


def frozen_slices(shape: Sequence[int], boxes: Sequence[Box]) -> list[tuple[slice, ...]] | None:
    """The frozen elements (outside the union of ``boxes``) of a tensor of ``shape`` as a few boxes
    of slices, or None when the region is too scattered for boxes to pay off: exactly what
    :func:`frozen_slices_of_mask` finds in ``to_mask(shape, boxes)``, without building that mask.

    Each dimension is cut at the boxes' bounds; the tensor is then a grid of cells, each inside or
    outside every box, and the grid (one element per cell: 64 for the experts of a stack) is what the
    mask search reads. A stacked expert tensor's dense mask would cost one byte per element.

        >>> frozen_slices((6, 4), (((0, 0, 2),),))  # rows 0-1 train
        [(slice(2, 6, None), slice(0, 4, None))]
        >>> frozen_slices((4, 8), (((0, 0, 1),), ((0, 2, 3),)))  # experts 0 and 2 of a stack train
        [(slice(1, 2, None), slice(0, 8, None)), (slice(3, 4, None), slice(0, 8, None))]
    """
    cuts = [sorted({0, size, *(min(max(x, 0), size) for box in boxes for x in span(box, dim, shape))})
            for dim, size in enumerate(shape)]
    grid = torch.zeros(tuple(len(c) - 1 for c in cuts), dtype=torch.bool)
    for box in boxes:
        grid[tuple(slice(bisect.bisect_left(c, start), bisect.bisect_left(c, stop))
                   for c, (start, stop) in zip(cuts, bounds(shape, box)))] = True
    cells = frozen_slices_of_mask(grid)
    if cells is None:
        return None
    return [tuple(slice(c[s.start], c[s.stop]) for c, s in zip(cuts, cell)) for cell in cells]


def frozen_slices_of_mask(trainable: torch.Tensor) -> list[tuple[slice, ...]] | None:
    """The frozen (False) elements of a boolean mask as a few boxes of slices, or None when the
    region is too scattered for boxes to pay off.

    Cuts each dimension where consecutive slices of the mask differ; the mask is constant on every
    cell between cuts, so the frozen cells (then merged along dimension 0) cover exactly the frozen
    elements.

        >>> frozen_slices_of_mask(to_mask((6, 4), (((0, 0, 2),),), "cpu"))  # rows 0-1 train
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
    if math.prod(len(c) - 1 for c in cuts) > MAX_FROZEN_SLICES:
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


def within(shape: Sequence[int], boxes: Sequence[Box],
           part: Sequence[slice]) -> tuple[tuple[int, ...], tuple[Box, ...]]:
    """The shape of the part ``part`` (one slice per dimension, e.g. a rank's shard) of a tensor of
    ``shape``, and ``boxes`` cut to that part, in its own indices.

        >>> within((6, 4), (((0, 0, 2),), ((0, 4, 6), (1, 0, 2))), (slice(3, 6), slice(0, 4)))
        ((3, 4), (((0, 1, 3), (1, 0, 2)),))
    """
    local_shape = tuple(s.stop - s.start for s in part)
    found = []
    for box in boxes:
        local = []
        for dim, (start, stop) in enumerate(bounds(shape, box)):
            low, high = max(start, part[dim].start), min(stop, part[dim].stop)
            if low >= high:
                break
            local.append((dim, low - part[dim].start, high - part[dim].start))
        else:
            found.append(normalise(tuple(local), local_shape))
    return local_shape, tuple(found)
