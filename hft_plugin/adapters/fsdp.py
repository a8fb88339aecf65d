"""What half fine-tuning needs under PyTorch FSDP, for every adapter whose framework uses it
(the HF Trainer through accelerate's ``fsdp_config``).

FSDP2 (``fully_shard``; accelerate's ``fsdp_version=2``, the Trainer's default) keeps one
parameter per tensor, as a DTensor, so frozen and trainable tensors can share an FSDP unit: whole
tensors frozen before the wrap get no gradient and no optimizer state. It replaces the parameter
objects, which the :class:`~hft_plugin.freeze.HFTHandle` follows by name, and partly trained
(fused) tensors are masked on each rank's shard (:mod:`hft_plugin.shards`).

FSDP1 (``FullyShardedDataParallel``) flattens each unit's tensors into one flat parameter. With
``use_orig_params=False`` a unit must be all frozen or all trainable, which half fine-tuning never
is; with ``use_orig_params=True`` whole tensors work, but a fused tensor's gradient is a flat
slice of its unit's shard, where its frozen rows cannot be found. :func:`check_fsdp` refuses both
before anything is wrapped.

    >>> check_fsdp(None, None) is None   # no FSDP: nothing to check
    True
"""

from __future__ import annotations

from typing import Any

from ..errors import IntegrationError


def fsdp_plugin(accelerator: Any) -> Any:
    """accelerate's ``FullyShardedDataParallelPlugin`` of ``accelerator``, or None without FSDP."""
    state = getattr(accelerator, "state", None)
    return getattr(state, "fsdp_plugin", None) if state is not None else None


def is_fsdp2_module(model: Any) -> bool:
    """True for a model that ``fully_shard`` has wrapped (its class becomes ``FSDP<Name>``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(model, FSDPModule)


def check_fsdp(plugin: Any, handle: Any) -> None:
    """Refuse an FSDP set-up under which this half cannot train exactly; FSDP2 passes.

    ``plugin`` is accelerate's ``FullyShardedDataParallelPlugin`` (None: no FSDP); ``handle`` the
    applied :class:`~hft_plugin.freeze.HFTHandle`.

    Raises:
        IntegrationError: FSDP1 with ``use_orig_params=False``; FSDP1 with fused tensors trained
            in part. The message says to use FSDP2 (``fsdp_config={"version": 2}``).
    """
    if plugin is None or getattr(plugin, "fsdp_version", 1) == 2:
        return
    if not getattr(plugin, "use_orig_params", False):
        raise IntegrationError(
            "FSDP1 with use_orig_params=False flattens each FSDP unit into one parameter that is either frozen or "
            "trained, but half fine-tuning freezes half the tensors of every unit. Use FSDP2 (fsdp_config="
            "{'version': 2}, the default of transformers 5) or FSDP1 with use_orig_params=True "
            "(fsdp_config={'use_orig_params': True})."
        )
    partial = list(handle.mechanisms()) if handle is not None else []  # masked or through region parameters
    if partial:
        raise IntegrationError(
            f"{len(partial)} fused tensors (e.g. {partial[0]}) are trained in part; FSDP1 keeps their "
            "gradients as flat slices of its flattened shards, where the frozen rows cannot be masked. Use FSDP2 "
            "(fsdp_config={'version': 2}, the default of transformers 5), or strategy='layer' (whole tensors only)."
        )
