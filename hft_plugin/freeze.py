"""Apply a Selection to a model, and undo it.

Whole frozen tensors get ``requires_grad=False`` (no gradient, no optimizer state). Partly frozen
tensors keep ``requires_grad`` and are masked by :mod:`hft_plugin.masking` once an optimizer is
attached. Everything is recorded so :meth:`HFTHandle.remove` puts the model back as it was.
"""

from __future__ import annotations

import logging
import weakref
from typing import Iterator

import torch
from torch import nn

from .errors import SelectionMismatchError
from .layouts.base import param_shape, unwrap_model
from .masking import FrozenRestore, GradientMask, needs_restore, region_mask
from .selection import Selection, check_fits, check_model, check_trains_something
from .shards import local_trainable_mask

logger = logging.getLogger("hft_plugin")

# model -> its active handle; weak, and not an attribute, so copies of a model carry no handle
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, HFTHandle]" = weakref.WeakKeyDictionary()

# Module names that wrappers insert into parameter names (FSDP1, activation checkpointing, torch.compile).
_WRAPPER_NAMES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _canonical(name: str) -> str:
    for wrapper in _WRAPPER_NAMES:
        name = name.replace(wrapper, "")
    return name


class HFTHandle:
    """A selection applied to a model.

    ``parameters()`` is exactly what the optimizer should own; ``attach(optimizer)`` keeps the
    frozen regions of fused tensors still; ``remove()`` restores the model's flags and hooks.

    The handle follows wrappers that put new parameter objects in place (FSDP2's ``fully_shard``
    replaces every parameter by a DTensor): each of these methods re-reads the model's parameters
    by name when they changed (:meth:`refresh_parameters`).
    """

    def __init__(self, model: nn.Module, selection: Selection):
        self.model = model
        self.selection = selection
        self._original_flags: dict[str, bool] = {}
        self._params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self._masked: dict[str, tuple] = {}  # partly trained tensor -> its trainable boxes
        self._hooks: list = []
        self.mask: GradientMask | None = None
        self.restore: FrozenRestore | None = None
        self.removed = False

    # -- applying ------------------------------------------------------------------------------------
    def _apply(self) -> None:
        plan = self.selection.plan()
        kept_frozen = []
        for name, param in self._params.items():
            self._original_flags[name] = param.requires_grad
        for name in plan.frozen:
            self._params[name].requires_grad_(False)
        for name in plan.trainable:
            if not self._original_flags[name]:
                kept_frozen.append(name)
        for name, boxes in plan.partial.items():
            param = self._params[name]
            if not self._original_flags[name]:
                kept_frozen.append(name)
                continue
            self._masked[name] = boxes  # the trainable boxes; dense masks are built only when needed
        if kept_frozen:
            logger.warning("hft_plugin: %d parameters you froze stay frozen (e.g. %s).", len(kept_frozen), kept_frozen[0])

    def refresh_parameters(self) -> bool:
        """Take the model's current parameter objects, by name, if a wrapper replaced them (FSDP2's
        ``fully_shard`` puts DTensor parameters in place). Returns whether anything changed.

        Called by :meth:`parameters`, :meth:`attach` and :meth:`remove`, so a loop needs no call of
        its own. Hooks attached to the replaced tensors are dropped: attach the optimizer (built
        from the new :meth:`parameters`) again.

        Raises:
            SelectionMismatchError: a parameter of the selection is no longer in the model.
        """
        current = {_canonical(name): param for name, param in self.model.named_parameters()}
        if all(current.get(_canonical(name)) is param for name, param in self._params.items()):
            return False
        missing = [name for name in self._params if _canonical(name) not in current]
        if missing:
            raise SelectionMismatchError(
                f"{len(missing)} parameters of the selection are no longer in the model (e.g. {missing[0]}); a "
                "wrapper renamed or removed them. Apply the selection to the model as it is now."
            )
        self._params = {name: current[_canonical(name)] for name in self._params}
        if self._hooks:
            logger.warning("hft_plugin: the model's parameters were replaced (e.g. by fully_shard) after an optimizer "
                           "was attached; build the optimizer from handle.parameters() and attach it again.")
            self._detach_hooks()
            self.mask = self.restore = None
        return True

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters that train (whole or in part), in model order."""
        self.refresh_parameters()
        for name, param in self._params.items():
            if param.requires_grad:
                yield name, param

    def parameters(self) -> list[nn.Parameter]:
        """Exactly the parameters an optimizer should own."""
        return [p for _, p in self.named_parameters()]

    @property
    def masked_parameters(self) -> dict[str, nn.Parameter]:
        """The partly trained (fused) tensors, by name."""
        self.refresh_parameters()
        return {n: self._params[n] for n in self._masked}

    def trainable_mask(self, name: str, device="cpu") -> torch.Tensor:
        """A boolean mask of the trainable elements of the partly trained tensor ``name``."""
        return region_mask(param_shape(self._params[name]), self._masked[name], device=device)

    def attach(self, optimizer: torch.optim.Optimizer, restore: bool | None = None) -> "HFTHandle":
        """Keep the frozen regions of partly trained tensors still under ``optimizer``.

        Masks their gradients once per step (one fused call, from a step pre-hook). ``restore``:
        also put frozen elements back after each step; by default only where masking alone cannot
        guarantee it (weight decay, or an optimizer that is not elementwise). Without masked
        tensors this does nothing.
        """
        if not self._masked:
            return self
        self.refresh_parameters()
        self._detach_hooks()  # one optimizer at a time: attaching again replaces the hooks
        params = [self._params[n] for n in self._masked]
        # Built on the host and dropped once the frozen blocks are found: no mask stays in memory.
        # A sharded (DTensor) parameter is masked on this rank's shard.
        masks = [local_trainable_mask(n, self._params[n], self.trainable_mask(n)) for n in self._masked]
        self.mask = GradientMask(params, masks)
        if restore is None:
            restore = needs_restore(optimizer, params)
        if restore:
            logger.info("hft_plugin: %s with weight decay or mixing updates: restoring frozen slices after each step.",
                        type(optimizer).__name__)
            self.restore = FrozenRestore(params, masks)
        else:
            self.restore = None
        self._hooks.append(optimizer.register_step_pre_hook(lambda *_: self.mask.apply()))
        if self.restore is not None:
            self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.restore.apply()))
        return self

    def _detach_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def mask_gradients(self) -> None:
        """Mask the frozen regions' gradients now (e.g. before clipping). Idempotent."""
        if self.mask is not None:
            self.mask.apply()

    def refresh(self) -> None:
        """Take the current weights as the frozen values to restore (call after loading weights
        into a model whose optimizer is already attached, e.g. when resuming)."""
        if self.restore is not None:
            self.restore.refresh()

    # -- undoing -------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Restore every ``requires_grad`` flag and remove the optimizer hooks. A second call is harmless."""
        if self.removed:
            return
        self._run_on_remove()
        self._detach_hooks()
        try:
            self.refresh_parameters()
        except SelectionMismatchError:  # renamed by a wrapper: restore what can still be reached
            pass
        for name, flag in self._original_flags.items():
            self._params[name].requires_grad_(flag)
        self.removed = True
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]

    def on_remove(self, callback) -> None:
        """Call ``callback()`` when this handle is removed, before any flag changes. A callback that
        raises stops the removal with the model unchanged; calling ``remove()`` again retries it."""
        self.__dict__.setdefault("_on_remove", []).append(callback)

    def _run_on_remove(self) -> None:
        callbacks = self.__dict__.get("_on_remove", [])
        while callbacks:
            callbacks[0]()
            callbacks.pop(0)

    def __repr__(self) -> str:
        trainable = sum(1 for _ in self.named_parameters())
        return (f"HFTHandle(round={self.selection.config.round}, trainable_tensors={trainable}, "
                f"masked_tensors={len(self._masked)}, removed={self.removed})")


def apply_selection(model: nn.Module, selection: Selection) -> HFTHandle:
    """Freeze the half of ``model`` that ``selection`` does not train.

    Checks everything first (the model can be trained, the selection was made for this model's
    structure) and changes nothing if a check fails. A model that already has a selection applied
    has it removed first, so rounds can follow each other on one model object.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from hft_plugin import apply_selection, select_half
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128,
        ...     num_hidden_layers=2, num_attention_heads=4, vocab_size=128))
        >>> handle = apply_selection(model, select_half(model, round=0))
        >>> optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-3)
        >>> _ = handle.attach(optimizer)
        >>> handle.remove()
    """
    model = check_model(model)
    check_fits(model, selection)
    previous = _ACTIVE.get(model)
    check_trains_something(selection, previous._original_flags if previous is not None else model)
    if previous is not None:
        previous.remove()
    handle = HFTHandle(model, selection)
    handle._apply()
    _ACTIVE[model] = handle
    return handle


def active_handle(model: nn.Module) -> HFTHandle | None:
    """The handle of the selection applied to ``model``, if any."""
    return _ACTIVE.get(unwrap_model(model))
