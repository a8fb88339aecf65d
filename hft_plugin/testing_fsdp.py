"""A test shim: let accelerate take its FSDP path on CPU ranks (gloo), so the HF Trainer's FSDP2
path can be tested without GPUs.

accelerate 1.15 decides in ``AcceleratorState.__init__`` (accelerate/state.py) whether a run is
FSDP: it sets ``distributed_type = DistributedType.FSDP`` and keeps the ``fsdp_plugin`` only when
the process group is a GPU-type one (``MULTI_GPU``, ``MULTI_XPU``, ``MULTI_NPU``, ...). For CPU
ranks (``MULTI_CPU``, gloo) that branch is skipped, so a Trainer given ``fsdp_config`` silently
builds DDP. :func:`accelerate_fsdp_on_cpu` replaces exactly that decision and nothing else: after
``AcceleratorState.__init__`` has built a fresh state on CPU ranks, it takes the decision as the
GPU branch would (FSDP when an ``fsdp_plugin`` is given or ``ACCELERATE_USE_FSDP=true``, with the
plugin's mixed precision set the same way; otherwise the CPU state as it was). Everything after
that decision (``Accelerator.prepare``, ``fully_shard``, the Trainer's FSDP2 set-up, saving and
loading) is accelerate's and torch's own code, unchanged.

For tests only: a real multi-GPU run needs no shim.

    >>> with accelerate_fsdp_on_cpu():
    ...     pass   # build TrainingArguments(use_cpu=True, fsdp=True, fsdp_config={"version": 2}) and train
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

_MARKER = "_hft_fsdp_on_cpu"


def _wanted(fsdp_plugin) -> bool:
    return fsdp_plugin is not None or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def install() -> None:
    """Patch ``accelerate.state.AcceleratorState.__init__`` (idempotent; :func:`uninstall` undoes it)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, _MARKER, False):
        return

    @functools.wraps(original)
    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        fresh = not AcceleratorState._shared_state
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        device = getattr(self, "device", None)
        # A CPU group: MULTI_CPU, or FSDP left in PartialState by an earlier state of this process.
        if not fresh or device is None or device.type != "cpu" or self.distributed_type not in (
                DistributedType.MULTI_CPU, DistributedType.FSDP):
            return
        if _wanted(fsdp_plugin):  # what the GPU branch of AcceleratorState.__init__ does
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no" and fsdp_plugin is not None:
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
        else:
            self.distributed_type = DistributedType.MULTI_CPU
            self.fsdp_plugin = None
        PartialState._shared_state["distributed_type"] = self.distributed_type

    setattr(__init__, _MARKER, True)
    __init__.__wrapped_original__ = original
    AcceleratorState.__init__ = __init__


def uninstall() -> None:
    """Put ``AcceleratorState.__init__`` back."""
    from accelerate.state import AcceleratorState

    current = AcceleratorState.__init__
    if getattr(current, _MARKER, False):
        AcceleratorState.__init__ = current.__wrapped_original__


@contextlib.contextmanager
def accelerate_fsdp_on_cpu() -> Iterator[None]:
    """:func:`install` for the duration of a ``with`` block."""
    install()
    try:
        yield
    finally:
        uninstall()
