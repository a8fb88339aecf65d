"""Apply a Selection to a model, and undo it.

Whole frozen tensors get ``requires_grad=False`` (no gradient, no optimizer state). A partly trained
tensor (a fused ``qkv_proj``, a stacked expert tensor) uses one of three mechanisms, chosen per
tensor when the selection is applied by the ordered dispatch of :mod:`hft_plugin.mechanisms`
(:meth:`HFTHandle.mechanisms`):

* ``experts``: a stacked experts tensor of a transformers experts module. The optimizer owns its
  trainable boxes as region parameters (:mod:`hft_plugin.regions`), which the model does not list;
  a frozen expert's weight gradient is never formed (:mod:`hft_plugin.mechanisms.experts`).
* ``rows``: the weight or bias of an ``nn.Linear`` or of transformers' ``Conv1D``, the same way; the
  module's backward computes the weight gradient of the trainable rows (columns) only
  (:mod:`hft_plugin.mechanisms.rows`).
* ``mask``: everything else, every tensor already sharded when the selection is applied, and every
  partly trained tensor with ``partial="mask"`` (DeepSpeed ZeRO keeps gradients in flat partitions;
  FSDP2 shards each tensor: apply with ``partial="mask"`` before ``fully_shard``): the optimizer
  owns the tensor whole and its frozen blocks' gradients are zeroed once per step
  (:mod:`hft_plugin.mechanisms.mask`, on each rank's shard under FSDP2), and put back after the step
  where a zero gradient is not enough. Where each such tensor is frozen is found from its boxes once
  and shared by every user of it (:class:`~hft_plugin.mechanisms.mask.Frozen`, owned by the handle);
  no dense mask is built for a block-shaped region (a stacked expert tensor's would cost one byte per
  element).

To everything but the optimizer, an applied model is the same model frozen by hand: the tensors it
lists, their names, shapes and ``requires_grad`` flags (a partly trained tensor keeps
``requires_grad=True``, as it would by hand), its state dict, copies and pickles. Everything is
recorded so :meth:`HFTHandle.remove` puts the model back as it was. A copy (``deepcopy``, pickle) of
an applied model carries the flags of its round and a note of them (:data:`APPLIED`), so
:func:`apply_selection` on the copy restores them before it applies a new selection.
"""

from __future__ import annotations

import logging
import weakref
from types import ModuleType
from typing import Callable, Iterator

import torch
from torch import nn

from . import mechanisms, optimizers, regions
from .boxes import Box, to_mask, within
from .errors import IntegrationError, SelectionMismatchError
from .layouts.base import param_shape, unwrap_model
from .mechanisms.mask import Frozen, FrozenRestore, GradientMask, needs_restore
from .selection import Selection, check_fits, check_model, check_trains_something
from .shards import is_sharded, local_part

logger = logging.getLogger("hft_plugin")

PARTIAL_MODES = ("auto", "mask")

# model -> its active handle; weak, and not an attribute, so copies of a model carry no handle
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, HFTHandle]" = weakref.WeakKeyDictionary()
# The model attribute that records an applied selection's round and the flags it changed: plain data,
# so a copy or a pickle of the model carries it, and apply_selection on the copy can undo them.
APPLIED = "_hft_applied"

# Module names that wrappers insert into parameter names (FSDP1, activation checkpointing, torch.compile).
_WRAPPER_NAMES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _canonical(name: str) -> str:
    for wrapper in _WRAPPER_NAMES:
        name = name.replace(wrapper, "")
    return name


class _Attachment:
    """One optimizer attached to a handle: its hooks, and the masks of the mask-mechanism tensors it owns."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = weakref.ref(optimizer)
        self.hooks: list = []
        self.mask: GradientMask | None = None
        self.restore: FrozenRestore | None = None

    def detach(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()


class HFTHandle:
    """A selection applied to a model.

    ``parameters()`` is exactly what the optimizer should own; ``attach(optimizer)`` checks that an
    optimizer fits and keeps mask-mechanism tensors' frozen blocks still under it; ``remove()``
    restores the model's flags, modules and experts implementation.

    The handle follows wrappers that put new parameter objects in place (FSDP2's ``fully_shard``
    replaces every parameter by a DTensor): each of these methods re-reads the model's parameters
    by name when they changed (:meth:`refresh_parameters`).

    The model owns its handle (:func:`active_handle` finds it) and the handle refers to the model
    weakly: a model a program drops is freed, applied or not.
    """

    def __init__(self, model: nn.Module, selection: Selection, partial: str = "auto"):
        # weak: the registry of applied handles is keyed by the model, and a strong reference here
        # would keep every model HFT was applied to alive until the process ends
        self._model = weakref.ref(model)
        self.selection = selection
        self.partial = partial
        self._original_flags: dict[str, bool] = {}
        self._params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self._masked: dict[str, tuple[Box, ...]] = {}  # mask mechanism: tensor -> its trainable boxes
        self._partial: dict[str, tuple[Box, ...]] = {}  # every partly trained tensor -> its trainable boxes
        self._mechanisms: dict[str, str] = {}
        self._why_mask: dict[str, str] = {}
        self._partials: dict[str, regions.PartialTensor] = {}  # rows and experts: tensor -> its regions
        self._regions: dict[str, nn.Parameter] = {}  # region name -> region parameter
        self._forward_modules: list[nn.Module] = []
        self._trainable_names: list[str] = []
        self._attachments: list[_Attachment] = []
        self._covered = False
        self._all_mask: GradientMask | None = None
        # Where each mask-mechanism tensor is frozen, found once and shared by every user (the gradient mask
        # and restore of each attached optimizer, mask_gradients, a ZeRO gradient hook); released on remove().
        self._frozen: dict[tuple[str, bool], Frozen] = {}  # (tensor, on its shard) -> its frozen blocks
        self.removed = False

    # -- applying ------------------------------------------------------------------------------------
    def _plan_mechanisms(self, plan) -> dict[str, tuple[ModuleType, mechanisms.Candidate]]:
        """Per partly trained tensor of ``plan``: its mechanism (:data:`hft_plugin.mechanisms.DISPATCH`,
        first match) and what it was chosen for. Changes nothing."""
        owners = _owners(self.model)
        chosen = {}
        for name, boxes in plan.partial.items():
            if not self._params[name].requires_grad:
                continue  # frozen by the user: stays frozen whole
            module, attr = owners.get(name, (None, ""))
            tensor = mechanisms.candidate(name, self._params[name], boxes, module, attr,
                                          shared=bool(owners.get(("shared", name))), partial=self.partial)
            mechanism = mechanisms.choose(tensor)
            if mechanism is mechanisms.mask:
                why = mechanisms.why_mask(tensor)
                if why:
                    self._why_mask[name] = why
            chosen[name] = (mechanism, tensor)
        return chosen

    def _apply(self) -> None:
        plan = self.selection.plan()
        for name, param in self._params.items():
            self._original_flags[name] = param.requires_grad
        chosen = self._plan_mechanisms(plan)  # raises before anything changes
        kept_frozen = [n for n in plan.trainable if not self._original_flags[n]]
        kept_frozen += [n for n in plan.partial if not self._original_flags[n]]
        for name in plan.frozen:
            self._params[name].requires_grad_(False)
        by_module: dict[int, tuple[nn.Module, ModuleType, list]] = {}
        for name, (mechanism, tensor) in chosen.items():
            self._partial[name] = tensor.boxes
            self._mechanisms[name] = mechanism.NAME
            if mechanism is mechanisms.mask:
                self._masked[name] = tensor.boxes
                continue
            partial = mechanism.regions(tensor, self.model)
            self._partials[name] = partial
            self._regions.update((r.name, r.param) for r in partial.regions)
            by_module.setdefault(id(tensor.module), (tensor.module, mechanism, []))[2].append(partial)
        for module, mechanism, partials in by_module.values():
            self._forward_modules.append(module)
            mechanism.install(module, partials)
        self._trainable_names = []
        for name, param in self._params.items():  # model order; a partly trained tensor by its regions
            if name in self._partials:
                self._trainable_names.extend(r.name for r in self._partials[name].regions)
            elif param.requires_grad:
                self._trainable_names.append(name)
        self.model.__dict__[APPLIED] = {"round": self.selection.config.round,
                                        "requires_grad": dict(self._original_flags)}
        if kept_frozen:
            logger.warning("hft_plugin: %d parameters you froze stay frozen (e.g. %s).", len(kept_frozen), kept_frozen[0])

    # -- what trains ---------------------------------------------------------------------------------
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
        if self._attachments:
            logger.warning("hft_plugin: the model's parameters were replaced (e.g. by fully_shard) after an optimizer "
                           "was attached; build the optimizer from handle.parameters() and attach it again.")
            for attachment in self._attachments:
                attachment.detach()
            self._attachments.clear()
        self._all_mask = None
        self._frozen.clear()  # a sharded tensor's shard may differ
        return True

    def _link(self) -> None:
        """Every region views its tensor's current storage and gradient (see :mod:`hft_plugin.regions`)."""
        for partial in self._partials.values():
            partial.link()

    def _tensor(self, name: str) -> nn.Parameter:
        """A trainable tensor or region parameter by name."""
        param = self._regions.get(name)
        return self._params[name] if param is None else param

    @property
    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        self.refresh_parameters()
        self._link()
        return [(n, self._tensor(n)) for n in self._trainable_names]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """What trains, in model order: whole trainable tensors, region parameters (named
        ``<tensor>_hft<i>``), and partly trained tensors of the mask mechanism."""
        return iter(self._trainable)

    @property
    def model(self) -> nn.Module:
        """The model the selection was applied to.

        The handle holds it weakly, so that a model a program drops is freed with what HFT put on
        it; keep your own reference to the model as long as you use the handle.

        Raises:
            ReferenceError: the model no longer exists (nothing referenced it but this handle).
        """
        model = self._model()
        if model is None:
            raise ReferenceError("the model this HFT handle was applied to no longer exists: nothing but the handle "
                                 "referenced it. Keep a reference to the model (model = ...; "
                                 "handle = apply_selection(model, selection)) while you use the handle.")
        return model

    def parameters(self) -> list[nn.Parameter]:
        """Exactly the parameters an optimizer should own."""
        return [p for _, p in self._trainable]

    def mechanisms(self) -> dict[str, str]:
        """Per partly trained tensor, its mechanism: ``"rows"``, ``"experts"`` or ``"mask"``."""
        return dict(self._mechanisms)

    def mechanism_summary(self) -> str:
        """One line naming how many partly trained tensors use each mechanism, and why any use the mask."""
        if not self._mechanisms:
            return "no tensor trains in part (every tensor trains or is frozen whole)"
        counts: dict[str, int] = {}
        for mechanism in self._mechanisms.values():
            counts[mechanism] = counts.get(mechanism, 0) + 1
        total = len(self._mechanisms)
        text = (f"{total} tensor{'s' if total != 1 else ''} train{'' if total != 1 else 's'} in part: "
                + ", ".join(f"{n} through the {m} mechanism" for m, n in sorted(counts.items())))
        if self._why_mask:
            name, why = next(iter(self._why_mask.items()))
            text += f" (mask for e.g. {name}: {why})"
        return text

    @property
    def regions(self) -> dict[str, list[str]]:
        """Per partly trained tensor of the rows and experts mechanisms, the names of its region
        parameters (``<tensor>_hft<i>``; the optimizer owns them, the model does not list them)."""
        return {name: [r.name for r in partial.regions] for name, partial in self._partials.items()}

    def region_parameters(self, name: str) -> list[tuple[tuple, nn.Parameter]]:
        """The region parameters of the partly trained tensor ``name``, each with its index into
        the tensor: ``tensor[index]`` is the region's view.

        Raises:
            KeyError: ``name`` is not a tensor of the rows or experts mechanism (see :meth:`regions`).
        """
        partial = self._partials[name]
        partial.link()
        return [(r.index, r.param) for r in partial.regions]

    @property
    def masked_parameters(self) -> dict[str, nn.Parameter]:
        """The partly trained tensors of the mask mechanism (the optimizer owns them whole), by name."""
        self.refresh_parameters()
        return {n: self._params[n] for n in self._masked}

    def trainable_mask(self, name: str, device="cpu") -> torch.Tensor:
        """A boolean mask of the trainable elements of the partly trained tensor ``name``, built for
        the caller (HFT's own masking works from the boxes and builds none for block-shaped regions)."""
        return to_mask(param_shape(self._params[name]), self._partial[name], device)

    def _frozen_blocks(self, name: str, local: bool = True) -> Frozen:
        """Where the masked tensor ``name`` is frozen, found once from its boxes: on this rank's shard
        of a sharded tensor (``local``), else in the full tensor."""
        param = self._params[name]
        shape, boxes = param_shape(param), self._partial[name]
        # checked on every call: the storage must have the tensor's own shape (not an FSDP1 flat shard)
        part = local_part(name, param, shape) if local else None
        key = (name, part is not None)
        frozen = self._frozen.get(key)
        if frozen is None:
            if part is not None:
                shape, boxes = within(shape, boxes, part)
            frozen = self._frozen[key] = Frozen.of_boxes(shape, boxes)
        return frozen

    def gradient_hook(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """A tensor hook that returns the gradient of the masked tensor ``name`` with its frozen
        elements zeroed, for where gradients never reach ``.grad`` (DeepSpeed ZeRO reduces them into
        flat partitions): ``param.register_hook(handle.gradient_hook(name))``. It shares the mask
        and frozen blocks of :meth:`attach` and :meth:`mask_gradients`.

        Raises:
            KeyError: ``name`` is not a tensor of the mask mechanism (see :attr:`masked_parameters`).
        """
        if name not in self._masked:
            raise KeyError(name)
        return self._frozen_blocks(name, local=False).zeroed

    # -- optimizers ----------------------------------------------------------------------------------
    def _names(self) -> tuple[dict[int, str], dict[int, str]]:
        """(tensors an optimizer may own, by id -> name; all the model's tensors). Besides
        :meth:`parameters`, a tensor the selection froze that was set to ``requires_grad=True``
        by hand afterwards may be owned: the user's explicit choice (warned about in :meth:`attach`)."""
        trainable = {id(p): n for n, p in self._trainable}
        everything = {id(p): n for n, p in self._params.items()}
        everything.update((id(p), n) for n, p in self._regions.items())
        for name, partial in self._partials.items():  # owned whole, a tensor that trains in part moves its frozen elements
            everything[id(partial.tensor)] = f"{name} whole (it trains in part: its regions are in handle.parameters())"
        for name in self._unfrozen_by_hand():
            trainable.setdefault(id(self._params[name]), name)
        return trainable, everything

    def _unfrozen_by_hand(self) -> list[str]:
        trains = set(self._trainable_names)
        return [n for n in self._original_flags if n not in trains and n not in self._mechanisms
                and self._params[n].requires_grad]

    def own_regions(self, optimizer) -> int:
        """Put the region parameters of every partly trained tensor (rows and experts mechanisms) in
        ``optimizer`` where it owns the whole tensor, in the same parameter group (same learning rate
        and weight decay), in place. For optimizers that a trainer builds from the model's
        ``requires_grad`` tensors before HFT can attach; returns how many tensors were replaced.

        Example:
            >>> import torch
            >>> from hft_plugin import apply_selection, select_half
            >>> from hft_plugin.testing import tiny_model
            >>> model = tiny_model("phi3")
            >>> handle = apply_selection(model, select_half(model, round=0))
            >>> optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
            >>> handle.own_regions(optimizer) > 0
            True
            >>> _ = handle.attach(optimizer)
            >>> handle.remove()
        """
        self._link()  # the regions view the tensors as they are now
        replacements = {id(partial.tensor): [r.param for r in partial.regions] for partial in self._partials.values()}
        return optimizers.replace_in_groups(optimizer, replacements)

    def _own_regions_if_fresh(self, optimizer) -> None:
        """An optimizer built from the model's ``requires_grad`` tensors owns each partly trained tensor
        whole; before it holds any state for one, its regions can take its place (same groups)."""
        whole = {id(p.tensor) for p in self._partials.values()}
        owned = [p for p in optimizers.owned(optimizer) if id(p) in whole]
        if owned and not any(optimizer.state.get(p) for p in owned):
            self.own_regions(optimizer)
            logger.info("hft_plugin: the optimizer owned %d tensors that train in part whole; their trainable regions "
                        "took their places in its parameter groups.", len(owned))

    def check_optimizer(self, optimizer, need_all: bool = True) -> None:
        """Raise :class:`~hft_plugin.errors.OptimizerMismatchError` unless ``optimizer`` owns exactly
        ``parameters()`` (``need_all=False``: a subset of them), holds state for nothing else, and
        keeps strided regions out of fused kernels."""
        trainable, everything = self._names()
        optimizers.check([optimizer], trainable, everything, need_all)

    def optimizer_fit(self, optimizer, need_all: bool = True) -> "optimizers.Fit":
        """How ``optimizer`` compares with :meth:`parameters` (what :meth:`check_optimizer` raises on)."""
        trainable, everything = self._names()
        return optimizers.compare([optimizer], trainable, everything, need_all)

    def attach(self, optimizer: torch.optim.Optimizer, restore: bool | None = None) -> "HFTHandle":
        """Check ``optimizer`` and keep the frozen elements still under it.

        Refuses (:class:`~hft_plugin.errors.OptimizerMismatchError`, before anything changes) an
        optimizer that owns or holds state for anything outside ``parameters()`` (a frozen tensor,
        another round's region, a partly trained tensor whose regions train), or that would run a
        fused kernel over a strided region. Several optimizers may be attached (e.g. Muon over the
        layers' matrices and AdamW over the rest), each keeping its protection; before the first step
        of any of them, together they must own all of ``parameters()``, else the same error.
        Attaching the same optimizer again replaces its hooks.

        For mask-mechanism tensors the optimizer owns, their frozen blocks' gradients are zeroed
        once per step (a step pre-hook); ``restore``: also put frozen elements back after each step,
        by default only where masking alone cannot keep them still (weight decay, or an optimizer
        that is not elementwise).
        """
        if self.removed:
            raise IntegrationError("This HFT handle was removed; apply a selection again and attach to its handle.")
        self._check_not_replaced()
        inner = optimizers.unwrap(optimizer)
        self._own_regions_if_fresh(inner)
        trainable, everything = self._names()
        optimizers.check([inner], trainable, everything, need_all=False)
        owned = {id(p) for p in optimizers.owned(inner)}
        by_hand = [n for n in self._unfrozen_by_hand() if id(self._params[n]) in owned]
        if by_hand:
            logger.warning("hft_plugin: %d tensors this round freezes were set to requires_grad=True by hand (e.g. %s); "
                           "the optimizer trains them as you asked.", len(by_hand), by_hand[0])
        self._detach(inner)
        attachment = _Attachment(inner)
        masked = [n for n in self._masked if id(self._params[n]) in owned]
        if masked:
            params = [self._params[n] for n in masked]
            # Found on the host once per tensor; a sharded (DTensor) tensor is masked on this rank's shard.
            masks = [self._frozen_blocks(n) for n in masked]
            attachment.mask = GradientMask(params, masks)
            if restore is None:
                restore = needs_restore(inner, params)
            if restore:
                logger.info("hft_plugin: %s with weight decay or mixing updates: restoring frozen slices after each step.",
                            type(inner).__name__)
                attachment.restore = FrozenRestore(params, masks)
        attachment.hooks.append(inner.register_step_pre_hook(lambda *_: self._before_step(attachment)))
        if attachment.restore is not None:
            attachment.hooks.append(inner.register_step_post_hook(lambda *_: attachment.restore.apply()))
        self._attachments.append(attachment)
        self._covered = False
        return self

    def _check_not_replaced(self) -> None:
        """A tensor with region parameters must not have been sharded (FSDP2's fully_shard would
        shard each region as a tensor of its own, no longer viewing its tensor)."""
        self.refresh_parameters()
        for name, mechanism in self._mechanisms.items():
            if mechanism != "mask" and is_sharded(self._params[name]):
                raise IntegrationError(regions.sharded_message(name))

    def _before_step(self, attachment: _Attachment) -> None:
        if not self._covered:
            live = [a.optimizer() for a in self._attachments if a.optimizer() is not None]
            trainable, everything = self._names()
            optimizers.check(live, trainable, everything, need_all=True,
                             what=f"The {len(live)} attached optimizers" if len(live) > 1 else "The attached optimizer")
            self._covered = True
        self._link()  # a cast, move or load since the last backward: the step must see the tensors as they are
        if attachment.mask is not None:
            attachment.mask.apply()

    def detach(self, optimizer) -> None:
        """Remove ``optimizer``'s hooks (e.g. before replacing it); the others stay attached."""
        self._detach(optimizers.unwrap(optimizer))

    def _detach(self, optimizer) -> None:
        for attachment in list(self._attachments):
            if attachment.optimizer() is optimizer or attachment.optimizer() is None:
                attachment.detach()
                self._attachments.remove(attachment)

    @property
    def mask(self) -> GradientMask | None:
        """The gradient mask of the last attached optimizer's mask-mechanism tensors, if any."""
        return self._attachments[-1].mask if self._attachments else None

    @property
    def restore(self) -> FrozenRestore | None:
        """The restore of the last attached optimizer's mask-mechanism tensors, if any."""
        return self._attachments[-1].restore if self._attachments else None

    def mask_gradients(self) -> None:
        """Zero the frozen blocks' gradients of every mask-mechanism tensor now (e.g. before
        clipping). Idempotent; nothing to do without mask-mechanism tensors."""
        if not self._masked:
            return
        self.refresh_parameters()
        if self._all_mask is None:
            names = list(self._masked)
            self._all_mask = GradientMask([self._params[n] for n in names], [self._frozen_blocks(n) for n in names])
        self._all_mask.apply()

    def refresh(self) -> None:
        """Take the current weights as the frozen values to restore (call after loading weights
        into a model whose optimizer is already attached, e.g. when resuming)."""
        for attachment in self._attachments:
            if attachment.restore is not None:
                attachment.restore.refresh()

    def cast_trainable_(self, dtype: torch.dtype) -> None:
        """Cast every trainable tensor, and every partly trained tensor with its regions, to
        ``dtype``, keeping the regions' storage shared (e.g. fp32 trainable weights of a bf16 model)."""
        with torch.no_grad():
            for name, param in self._trainable:
                if name not in self._regions:
                    param.data = param.data.to(dtype)
            for partial in self._partials.values():
                partial.tensor.data = partial.tensor.data.to(dtype)
                partial.link_values()

    # -- undoing -------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Restore every ``requires_grad`` flag, the modules' forwards and the experts
        implementation, unregister the regions (their tensors hold their values) and remove the
        optimizer hooks. A second call is harmless."""
        if self.removed:
            return
        if self._model() is None:  # the model is gone: nothing left to restore
            for attachment in self._attachments:
                attachment.detach()
            self._attachments.clear()
            self.removed = True
            return
        self._run_on_remove()
        for attachment in self._attachments:
            attachment.detach()
        self._attachments.clear()
        try:
            self.refresh_parameters()
        except SelectionMismatchError:  # renamed by a wrapper: restore what can still be reached
            pass
        self._all_mask = None
        self._frozen.clear()
        for module in self._forward_modules:
            regions.uninstall_forward(module)
        for partial in self._partials.values():
            partial.remove()
        self._forward_modules.clear()
        for name, flag in self._original_flags.items():
            self._params[name].requires_grad_(flag)
        self._trainable_names = []
        self.removed = True
        self.model.__dict__.pop(APPLIED, None)
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
        return (f"HFTHandle(round={self.selection.config.round}, trainable_tensors={len(self._trainable)}, "
                f"mechanisms={self.mechanisms() and sorted(set(self._mechanisms.values()))}, removed={self.removed})")


def _owners(model: nn.Module) -> dict:
    """Parameter name -> (owning module, attribute); ("shared", name) -> True for a tensor that
    several modules hold (tied)."""
    owners: dict = {}
    canonical = {id(p): n for n, p in model.named_parameters()}
    seen: dict[int, int] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is None:
                continue
            seen[id(param)] = seen.get(id(param), 0) + 1
            name = canonical.get(id(param))
            if name is not None and name not in owners and name == (f"{module_name}.{attr}" if module_name else attr):
                owners[name] = (module, attr)
    for name, (module, attr) in list(owners.items()):
        if seen.get(id(module._parameters[attr]), 0) > 1:
            owners[("shared", name)] = True
    return owners


def _same(a: Selection, b: Selection) -> bool:
    return (a.fingerprint == b.fingerprint and a.config == b.config and a.trainable_units == b.trainable_units)


def apply_selection(model: nn.Module, selection: Selection, *, partial: str = "auto") -> HFTHandle:
    """Freeze the half of ``model`` that ``selection`` does not train.

    Checks everything first (the model can be trained, the selection was made for this model's
    structure) and changes nothing if a check fails. A model that already has a selection applied
    has it removed first, so rounds can follow each other on one model object; applying the same
    selection again returns the handle already applied (its region parameters, so optimizers built
    from its ``parameters()`` stay valid).

    Args:
        model: the model (DDP/DeepSpeed/compile wrappers are looked through).
        selection: from :func:`~hft_plugin.select_half` on this model.
        partial: how partly trained tensors train. ``"auto"``: region parameters (``rows`` for
            ``nn.Linear``/``Conv1D``, ``experts`` for transformers' stacked experts) wherever they
            apply, the gradient mask elsewhere. ``"mask"``: the gradient mask for all (needed where
            gradients live in flat partitions, as under DeepSpeed ZeRO).

    Raises:
        UnsupportedModelError, SelectionMismatchError, NothingToTrainError: before anything changes.

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
    if partial not in PARTIAL_MODES:
        raise ValueError(f"partial={partial!r}; expected one of {PARTIAL_MODES}.")
    model = check_model(model)
    previous = _ACTIVE.get(model)
    if previous is not None and not previous.removed and previous.partial == partial and _same(previous.selection, selection):
        return previous
    check_fits(model, selection)
    copied = model.__dict__.get(APPLIED) if previous is None or previous.removed else None
    if copied is not None:  # a copy or a pickle of an applied model: its own flags are the ones before HFT
        check_trains_something(selection, _flags_before(model, copied))
    else:
        check_trains_something(selection, previous._original_flags if previous is not None else model)
    if previous is not None:
        previous.remove()
    if copied is not None:
        _strip_copied(model, copied, selection.config.round)
    handle = HFTHandle(model, selection, partial)
    handle._apply()
    _ACTIVE[model] = handle
    return handle


def _flags_before(model: nn.Module, applied: dict) -> dict[str, bool]:
    """The flags a copy of an applied model had before HFT: the recorded ones where recorded."""
    recorded = applied.get("requires_grad", {})
    return {n: recorded.get(n, p.requires_grad) for n, p in model.named_parameters()}


def _strip_copied(model: nn.Module, applied: dict, round: int) -> None:
    """Undo on a copy (deepcopy, pickle) of an applied model what its selection left: the flags it
    set, and the class forwards its copied modules carry as attributes."""
    flags = _flags_before(model, applied)
    for name, param in model.named_parameters():
        param.requires_grad_(flags[name])
    for module in model.modules():
        regions.drop_copied_forward(module)
    del model.__dict__[APPLIED]
    logger.info("hft_plugin: this model is a copy of a model with HFT round %s applied (deepcopy or pickle); the "
                "requires_grad flags it had before that round were restored before applying round %s.",
                applied.get("round"), round)


def active_handle(model: nn.Module) -> HFTHandle | None:
    """The handle of the selection applied to ``model``, if any."""
    return _ACTIVE.get(unwrap_model(model))
