"""Masks on the local shard of a sharded (DTensor) parameter, as FSDP2's ``fully_shard`` makes them.

FSDP2 replaces each parameter by a DTensor whose local tensor holds this rank's rows (``Shard(0)``,
``torch.chunk`` sizes: the first ranks hold ``ceil(rows / ranks)`` rows, the last ones fewer or
none), and the optimizer updates those local tensors in place. So the frozen blocks of a partly
trained (fused) tensor are masked where they are: its trainable boxes are cut to this rank's row
range (:func:`local_part`), and the gradient mask and the restore after each step work on the local
shard (:func:`hft_plugin.mechanisms.mask.local_tensor`), with no communication. A placement from
``shard_placement_fn`` (``Shard(dim)``), and meshes that also replicate (HSDP), follow the same
rule on their dimension. A layout this cannot map (``_StridedShard`` from FSDP combined with
tensor parallelism, ``Partial``) gets an :class:`~hft_plugin.errors.IntegrationError` naming the
tensor, never a wrong mask.

    >>> from torch.distributed.tensor import Replicate, Shard
    >>> local_index((5, 4), [Shard(0)], mesh_shape=(2,), coordinate=(1,))   # 5 rows on 2 ranks: 3 + 2
    (slice(3, 5, None), slice(0, 4, None))
    >>> local_index((8, 4), [Replicate(), Shard(1)], mesh_shape=(2, 2), coordinate=(1, 0))
    (slice(0, 8, None), slice(0, 2, None))
"""

from __future__ import annotations

from typing import Sequence

import torch

from .errors import IntegrationError


class UnsupportedPlacement(ValueError):
    """A placement :func:`local_index` cannot map to an index of the full tensor."""


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (FSDP2's sharded parameters and gradients)."""
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "to_local")


def local_index(shape: Sequence[int], placements: Sequence, mesh_shape: Sequence[int],
                coordinate: Sequence[int]) -> tuple[slice, ...]:
    """The slices of a full tensor of ``shape`` that the rank at ``coordinate`` of a device mesh of
    ``mesh_shape`` holds under ``placements`` (one per mesh dimension, applied in mesh order as
    DTensor applies them: each ``Shard(dim)`` cuts the current range of ``dim`` into
    ``torch.chunk`` pieces).

    Raises:
        UnsupportedPlacement: a placement other than ``Replicate`` and plain ``Shard``.
    """
    from torch.distributed.tensor import Replicate, Shard

    index = [slice(0, size) for size in shape]
    for mesh_dim, placement in enumerate(placements):
        if type(placement) is Replicate:
            continue
        if type(placement) is not Shard:  # _StridedShard, Partial, custom placements
            raise UnsupportedPlacement(f"{placement!r}")
        dim = placement.dim % len(shape)
        start, stop = index[dim].start, index[dim].stop
        chunk = -(-(stop - start) // mesh_shape[mesh_dim])  # ceil, as torch.chunk
        low = min(stop, start + chunk * coordinate[mesh_dim])
        index[dim] = slice(low, min(stop, low + chunk))
    return tuple(index)


def local_part(name: str, param: torch.Tensor, shape: Sequence[int]) -> tuple[slice, ...] | None:
    """The slices of the full tensor (of ``shape``) of parameter ``name`` that this rank's tensor
    holds: None for an ordinary parameter (it holds the whole), this rank's rows (or columns) for a
    DTensor. A partly trained tensor's frozen slices are then found on that part
    (:func:`hft_plugin.boxes.within`).

    Raises:
        IntegrationError: the parameter is sharded in a layout that cannot be mapped, or stored
            in another shape than its own (FSDP1's flattened shards), naming it and the remedy.
    """
    shape = tuple(shape)
    if not is_sharded(param):
        if tuple(param.shape) != shape:
            raise IntegrationError(
                f"{name} is trained in part, but its storage has shape {tuple(param.shape)}, not "
                f"{shape} (flattened or sharded by a wrapper, e.g. FSDP1's flat parameters), so its "
                "frozen slices cannot be masked. Use FSDP2 (fully_shard, or fsdp_config={'version': 2}), "
                "DeepSpeed through enable_hft, or strategy='layer' (whole tensors only)."
            )
        return None
    mesh = param.device_mesh
    coordinate = mesh.get_coordinate()
    try:
        if coordinate is None:
            raise UnsupportedPlacement("this rank is not in the parameter's device mesh")
        index = local_index(shape, param.placements, tuple(mesh.shape), coordinate)
    except UnsupportedPlacement as exc:
        raise IntegrationError(
            f"{name} is trained in part and sharded as {tuple(param.placements)} ({exc}); HFT masks the frozen "
            "rows of such tensors on each rank's shard only for Shard(dim) and Replicate placements. Shard it with "
            "FSDP2's default placement (no shard_placement_fn, or one returning Shard(dim)), or use "
            "strategy='layer' (whole tensors only)."
        ) from None
    found = tuple(s.stop - s.start for s in index)
    expected = tuple(param.to_local().shape)
    if found != expected:
        raise IntegrationError(
            f"{name} is trained in part; its local shard has shape {expected}, but its placements "
            f"{tuple(param.placements)} give {found}, so its frozen rows cannot be located. Use FSDP2's "
            "default placement, or strategy='layer' (whole tensors only)."
        )
    return index
