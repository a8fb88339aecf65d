"""Region parameters: the trainable parts of a partly trained tensor, owned by the optimizer alone.

A selection often trains only part of a fused tensor (Phi-3's ``qkv_proj`` rows for q and k, an
expert's slice of a stacked expert tensor). To everyone but the optimizer, such a tensor ``P`` looks
as it would on the same model frozen by hand: one parameter, ``requires_grad=True`` (requires_grad
is per tensor), listed once by ``parameters()``, with a gradient that is zero on its frozen
elements. So code that iterates, counts, copies, moves, casts, loads, pickles, compiles or averages
the model (EMA, TRL's reference sync, ``num_parameters``, ``deepcopy``, ``to``, ``load_state_dict``,
``torch.compile``) sees nothing of HFT; DDP reduces ``P.grad``, and ``clip_grad_norm_`` and a
gradient scaler see exactly the trainable gradients.

The optimizer owns *region parameters* instead of ``P``: one per trainable box,
``nn.Parameter(P.data[box])``, a view sharing ``P``'s storage (no copy), whose ``.grad`` is the
matching view of ``P.grad``. They are not registered on any module, so the model does not list
them; the handle does (``handle.parameters()``). So no optimizer, weight decay, momentum, reused
state or second optimizer can move a frozen element, and optimizer state is held for the trainable
elements only. One region per box, as the layout defines its parts (q, k, v; an expert's gate, up
and down): optimizers that are not elementwise treat them as they would separate matrices.

What keeps the regions linked to ``P`` (:class:`PartialTensor`), whatever a program does to ``P``:

* after every gradient accumulation into ``P`` (a post-accumulate-grad hook), and before every
  step of an attached optimizer, each region views ``P``'s current storage and ``P.grad``'s: a
  cast or move (``model.to``, ``param.data = ...``), an in-place or ``assign=True`` load, a new
  ``P.grad`` (``zero_grad``, DDP) are followed, and ``P``'s values win: they are what the program
  loaded, and a region can only have changed through a step, which this link precedes;
* before a gradient is accumulated into ``P`` (a tensor hook), a ``P.grad`` left over after the
  optimizer set its regions' gradients to None is dropped, so it does not accumulate twice.

The weight gradient of the frozen part is never computed where HFT runs the module's forward:
the ``rows`` mechanism (:mod:`hft_plugin.mechanisms.rows`) computes ``nn.Linear``'s and transformers
``Conv1D``'s weight gradient for the trainable boxes only, zero elsewhere, and the ``experts``
mechanism (:mod:`hft_plugin.mechanisms.experts`) does the same for stacked experts. That forward is
installed on the module instance (:class:`HFTForward`); a copy or a pickle of the module gets its
class's own forward back, so copies are plain models.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .boxes import Box, index as box_index
from .shards import is_sharded

logger = logging.getLogger("hft_plugin")

REGION_TAG = "_hft"  # region names: f"{tensor}{REGION_TAG}{i}"
# Region parameters of removed selections (id -> weak reference; tensors compare elementwise, so no
# WeakSet): an optimizer that still owns one belongs to another round.
_RETIRED: dict[int, weakref.ref] = {}


def is_retired(param: torch.Tensor) -> bool:
    """True for a region parameter of a selection that was removed."""
    ref = _RETIRED.get(id(param))
    return ref is not None and ref() is param


def _retire(param: nn.Parameter) -> None:
    key = id(param)
    _RETIRED[key] = weakref.ref(param, lambda _, key=key: _RETIRED.pop(key, None))


def sharded_message(name: str) -> str:
    return (f"{name} trains through region parameters, which cannot view a tensor that FSDP2's fully_shard "
            "sharded. For FSDP2, apply the selection with partial='mask' before fully_shard, or apply it after "
            "fully_shard: partly trained tensors are then masked on each rank's shard.")


@dataclasses.dataclass
class Region:
    """One trainable box of a partly trained tensor, as a parameter that views it."""

    name: str  # f"{tensor}_hft{i}": how handles, optimizers' checks and messages name it
    param: nn.Parameter
    box: Box
    index: tuple  # how the region indexes its tensor (an int for a single expert, else slices)


def _views(tensor: torch.Tensor, view: torch.Tensor) -> bool:
    """``tensor`` is exactly ``view`` (same storage, offset, strides, dtype and device)."""
    return (tensor.dtype == view.dtype and tensor.device == view.device and tensor.data_ptr() == view.data_ptr()
            and tensor.stride() == view.stride() and tensor.shape == view.shape)


class PartialTensor:
    """A tensor ``module.<attr>`` that trains in part: its region parameters, and the hooks that keep
    them viewing the tensor and its gradient.

    Args:
        module: the module that owns the tensor.
        attr: the tensor's attribute on ``module`` ("weight", "gate_up_proj", ...).
        name: the tensor's name in the model (for region names and messages).
        boxes: the trainable boxes, as the layout defines them.
        squeeze_leading: index a box that fixes dimension 0 to one index with an int (one expert).
        root: the model ``module`` belongs to (weakly), to tell an FSDP2-sharded model apart.
    """

    def __init__(self, module: nn.Module, attr: str, name: str, boxes: Sequence[Box], squeeze_leading: bool,
                 root: nn.Module | None = None):
        self.module = module
        self._root = weakref.ref(root) if root is not None else None
        self.attr = attr
        self.name = name
        param = module._parameters[attr]
        self.regions = []
        for i, box in enumerate(boxes):
            index = box_index(param.shape, box, squeeze_leading)
            self.regions.append(Region(f"{name}{REGION_TAG}{i}", nn.Parameter(param.data[index]), box, index))
        self._hooks: list = []
        self._hooked: torch.Tensor | None = None
        self._linked: tuple | None = None  # what the regions view, as of the last link
        param.requires_grad_(True)
        self._hook(param)

    @property
    def tensor(self) -> torch.Tensor:
        """The module's tensor as it is now (a load with ``assign=True`` puts a new object in place)."""
        return self.module._parameters[self.attr]

    def _hook(self, param: torch.Tensor) -> None:
        self._unhook()
        self._hooks = [param.register_hook(self._before_accumulate),
                       param.register_post_accumulate_grad_hook(self._after_accumulate)]
        self._hooked = param

    def _unhook(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._hooked = None

    def replaced(self) -> bool:
        """The module's tensor is not the object the hooks are on (checked at every forward)."""
        return self.module._parameters.get(self.attr) is not self._hooked

    def _before_accumulate(self, grad: torch.Tensor) -> None:
        param = self._hooked
        if param is not None and param.grad is not None and any(r.param.grad is None for r in self.regions):
            # The optimizer set its regions' gradients to None (zero_grad): the gradient left on the
            # tensor is stale and must not be accumulated into.
            param.grad = None

    def _after_accumulate(self, param: torch.Tensor) -> None:
        self.link()

    @torch.no_grad()
    def link(self) -> None:
        """Make every region view the tensor's current storage and gradient; the tensor's values win.

        Raises:
            IntegrationError: the tensor was sharded (FSDP2's ``fully_shard``) after HFT was applied.
        """
        param = self.tensor
        if param is None:
            return
        if param is not self._hooked and (is_sharded(param) or self._fully_sharded()):
            # FSDP2 holds the tensor sharded, and puts an unsharded copy in place for each forward only
            from .errors import IntegrationError

            raise IntegrationError(sharded_message(self.name))
        if param is not self._hooked:  # a new parameter object (load_state_dict(..., assign=True))
            if not param.requires_grad:
                param.requires_grad_(True)
            self._hook(param)
        grad = param.grad
        # Called after every backward and before every step: views are made only when the storage, dtype,
        # device or gradient changed since the last link (a step reuses the links its backward made).
        state = (id(param), param.data_ptr(), param.dtype, param.device, id(grad),
                 None if grad is None else grad.data_ptr())
        if state == self._linked and all((r.param.grad is None) == (grad is None) for r in self.regions):
            return
        data = param.data
        for region in self.regions:
            view = data[region.index]
            if not _views(region.param.data, view):
                region.param.data = view
            if grad is None:
                region.param.grad = None
            else:
                grad_view = grad[region.index]
                if region.param.grad is None or not _views(region.param.grad, grad_view):
                    region.param.grad = grad_view
        self._linked = state

    def _fully_sharded(self) -> bool:
        root = self._root() if self._root is not None else None
        return root is not None and any(type(m).__name__.startswith("FSDP") for m in root.modules())

    def remove(self) -> None:
        """Drop the hooks and retire the regions (the tensor holds their values)."""
        self.link_values()
        self._unhook()
        for region in self.regions:
            region.param.grad = None  # a stale region owned by an old optimizer must not step again
            _retire(region.param)

    @torch.no_grad()
    def link_values(self) -> None:
        """Regions view the tensor's storage (no gradients touched); for removal and casts."""
        param = self.tensor
        if param is None or is_sharded(param):
            return
        for region in self.regions:
            view = param.data[region.index]
            if not _views(region.param.data, view):
                region.param.data = view


# -- the forward installed on a module with partly trained tensors -------------------------------


class HFTForward:
    """The forward HFT installs on a module instance whose tensors train in part: ``compute(module,
    spec, *args, **kwargs)``, which returns the module's own output and computes the weight gradient
    of the trainable boxes only.

    A deep copy or a pickle of the module gets its class's own forward instead: a copy is a plain
    model (the model frozen by hand), and an applied selection belongs to one model object.
    """

    def __init__(self, module: nn.Module, partials: Sequence[PartialTensor], compute: Callable, spec: Any):
        self.module = module
        self.partials = tuple(partials)
        self.compute = compute
        self.spec = spec

    def __call__(self, *args, **kwargs):
        for partial in self.partials:
            if partial.replaced():
                partial.link()  # re-hook a tensor that a load with assign=True put in place
        return self.compute(self.module, self.spec, *args, **kwargs)

    def __deepcopy__(self, memo):
        module = memo.get(id(self.module), self.module)
        return types.MethodType(type(module).forward, module)

    def __reduce__(self):
        # Unpickled while the module's attributes are still empty: the class's forward.
        return (getattr, (self.module, "forward"))


def install_forward(module: nn.Module, partials: Sequence[PartialTensor], compute: Callable, spec: Any) -> None:
    module.forward = HFTForward(module, partials, compute, spec)


def uninstall_forward(module: nn.Module) -> None:
    if isinstance(module.__dict__.get("forward"), HFTForward):
        del module.__dict__["forward"]


def drop_copied_forward(module: nn.Module) -> bool:
    """Remove the class forward that a copy of an applied module carries as an instance attribute
    (:meth:`HFTForward.__deepcopy__`). Returns whether there was one."""
    forward = module.__dict__.get("forward")
    if isinstance(forward, types.MethodType) and forward.__self__ is module and \
            forward.__func__ is getattr(type(module).forward, "__func__", type(module).forward):
        del module.__dict__["forward"]
        return True
    if isinstance(forward, HFTForward):  # copied by a route that bypassed __deepcopy__
        del module.__dict__["forward"]
        return True
    return False
