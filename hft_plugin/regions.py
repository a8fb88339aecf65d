"""Region parameters: the trainable parts of a partly trained tensor, as parameters of their own.

A selection often trains only part of a fused tensor (Phi-3's ``qkv_proj`` rows for q and k, an
expert's slice of a stacked expert tensor). Each trainable box of such a tensor ``P`` becomes a
*region parameter*: ``nn.Parameter(P.data[box])``, a view that shares ``P``'s storage (no copy),
registered on the module that owns ``P`` beside it (``weight_hft0``, ``bias_hft1``,
``gate_up_proj_hft3``). ``P`` itself gets ``requires_grad=False``. So:

* the optimizer owns only trainable elements, and can hold state only for them: no optimizer, weight
  decay, momentum, reused state or second optimizer can move a frozen element;
* ``model.parameters()`` lists the regions: DDP reduces their gradients, ``clip_grad_norm_`` and a
  gradient scaler's overflow check see exactly the trainable gradients, and trainers put them in
  their weight-decay groups by name (a region of a bias has "bias" in its name);
* ``state_dict()`` leaves them out and ``load_state_dict()`` does not miss them (it writes into
  ``P`` in place, which they view): checkpoints are those of the model without HFT.

One region per trainable box, as the layout defines its parts (q, k, v; an expert's gate, up and
down): the optimizer sees the matrices a model with separate tensors would have, so optimizers that
are not elementwise (Adafactor's factored moments, orthogonalising updates) treat them as they
would treat separate matrices. A box of a stacked experts tensor fixes its leading dimension to one
expert and is indexed, not sliced: the region is that expert's matrix (or bias vector).

The weight gradient of the frozen part is never computed: :class:`RowsFunction` (here) replaces the
forward of a partly trained ``nn.Linear`` / transformers ``Conv1D``, and :mod:`hft_plugin.experts`
does the same for stacked experts.

Aliasing can be broken from outside (``model.to(dtype)``, ``model.half()``, a framework's
``param.data = param.data.float()``, ``copy.deepcopy``); :func:`ensure_aliased` checks it at every
forward (data pointers only) and repairs it: the regions' values win (the optimizer updates them),
``P`` takes the regions' dtype and device, and the same Parameter objects view ``P`` again, so
optimizers stay valid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import types
import weakref
from typing import Sequence

import torch
from torch import nn

from .layouts.base import Box
from .shards import is_sharded

logger = logging.getLogger("hft_plugin")

REGION_TAG = "_hft"  # region names: f"{attr}{REGION_TAG}{i}"
_STATE = "_hft_regions"  # module attribute: {attr: [Region, ...]}
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


@dataclasses.dataclass
class Region:
    """One trainable box of a partly trained tensor, as a parameter that views it."""

    name: str  # the attribute on the owning module, e.g. "weight_hft0"
    param: nn.Parameter
    box: Box
    index: tuple  # how the region indexes its tensor (an int for a single expert, else slices)


def box_index(shape: Sequence[int], box: Box, squeeze_leading: bool = False) -> tuple:
    """The index of ``box`` into a tensor of ``shape``; with ``squeeze_leading``, a box that fixes
    dimension 0 to one index (one expert of a stack) indexes it with an int.

        >>> box_index((4, 6, 8), ((0, 2, 3), (1, 0, 3)), squeeze_leading=True)
        (2, slice(0, 3, None), slice(None, None, None))
    """
    index: list = [slice(None)] * len(shape)
    for dim, start, stop in box:
        index[dim] = slice(start, stop)
    if squeeze_leading and index[0] != slice(None) and index[0].stop - index[0].start == 1:
        index[0] = index[0].start
    return tuple(index)


def module_regions(module: nn.Module) -> dict[str, list[Region]]:
    return module.__dict__.get(_STATE) or {}


def add_regions(module: nn.Module, attr: str, boxes: Sequence[Box], squeeze_leading: bool) -> list[Region]:
    """Freeze ``module.<attr>`` and register one region parameter per box of it."""
    param = module._parameters[attr]
    state = module.__dict__.setdefault(_STATE, {})
    if not state:
        module.__dict__["_hft_state_hooks"] = (
            module.register_state_dict_post_hook(_drop_regions_from_state_dict),
            module.register_load_state_dict_post_hook(_regions_are_not_missing),
        )
    regions = []
    for i, box in enumerate(boxes):
        index = box_index(param.shape, box, squeeze_leading)
        name = f"{attr}{REGION_TAG}{i}"
        if hasattr(module, name):
            raise RuntimeError(f"hft_plugin: {type(module).__name__} already has an attribute {name!r}.")
        region = nn.Parameter(param.data[index], requires_grad=True)
        module.register_parameter(name, region)
        regions.append(Region(name, region, box, index))
    param.requires_grad_(False)
    state[attr] = regions
    return regions


def remove_regions(module: nn.Module) -> None:
    """Unregister every region of ``module`` (its tensors already hold their values)."""
    state = module.__dict__.pop(_STATE, None) or {}
    ensure_aliased_state(module, state, warn=False)
    for regions in state.values():
        for region in regions:
            module._parameters.pop(region.name, None)
            region.param.grad = None  # a stale region owned by an old optimizer must not step again
            _retire(region.param)
    for hook in module.__dict__.pop("_hft_state_hooks", ()):
        hook.remove()


def sharded_message(name: str) -> str:
    return (f"{name} trains through region parameters, which FSDP2's fully_shard shards as tensors of their own "
            "(they no longer view the tensor). For FSDP2, apply the selection with partial='mask' before "
            "fully_shard, or apply it after fully_shard: partly trained tensors are then masked on each rank's shard.")


@contextlib.contextmanager
def hidden(model: nn.Module):
    """Take region parameters out of the modules' parameter lists while the block runs, so reading
    the model's structure (layouts, fingerprints) sees the model as it is without HFT."""
    saved = []
    for module in model.modules() if isinstance(model, nn.Module) else ():
        state = module.__dict__.get(_STATE)
        if state:
            saved.append((module, dict(module._parameters)))
            for items in state.values():
                for region in items:
                    module._parameters.pop(region.name, None)
    try:
        yield model
    finally:
        for module, params in saved:
            module._parameters.clear()
            module._parameters.update(params)


def requires_grad_flags(model: nn.Module) -> dict[str, bool]:
    """Each of the model's own parameters (regions left out) -> whether it trains: its
    ``requires_grad``, or True for a tensor that trains through region parameters."""
    with hidden(model):
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for prefix, module in model.named_modules():
        for attr in module_regions(module):
            flags[f"{prefix}.{attr}" if prefix else attr] = True
    return flags


def _drop_regions_from_state_dict(module, state_dict, prefix, local_metadata) -> None:
    for regions in module_regions(module).values():
        for region in regions:
            state_dict.pop(prefix + region.name, None)


def _regions_are_not_missing(module, incompatible_keys) -> None:
    names = {region.name for regions in module_regions(module).values() for region in regions}
    if names:
        incompatible_keys.missing_keys[:] = [
            k for k in incompatible_keys.missing_keys if k.rsplit(".", 1)[-1] not in names
        ]


# -- aliasing ------------------------------------------------------------------------------------


@torch.compiler.disable
def ensure_aliased(module: nn.Module) -> None:
    """Check (by data pointers) that every region of ``module`` still views its tensor; repair it if
    not. Called at every forward of a module with regions."""
    state = module.__dict__.get(_STATE)
    if state:
        ensure_aliased_state(module, state, warn=True)


def _all_aliased(param: torch.Tensor, regions: list[Region]) -> bool:
    """Every region parameter views ``param``'s storage, with its dtype and device."""
    storage, dtype, device = param.untyped_storage().data_ptr(), param.dtype, param.device
    return all(r.param.dtype == dtype and r.param.device == device and r.param.untyped_storage().data_ptr() == storage
               for r in regions)


def ensure_aliased_state(module: nn.Module, state: dict, warn: bool) -> None:
    for attr, regions in state.items():
        param = module._parameters.get(attr)
        if param is None:
            continue
        for region in regions:  # a wrapper may have put new parameter objects in place
            current = module._parameters.get(region.name)
            if current is not None and current is not region.param:
                region.param = current
        if is_sharded(param) or any(is_sharded(r.param) for r in regions):
            if warn:  # at a forward: training would not update the tensor the model computes with
                from .errors import IntegrationError

                raise IntegrationError(sharded_message(f"{type(module).__name__}.{attr}"))
            continue  # removing: the shards hold the values
        if _all_aliased(param, regions):
            continue
        _repair(module, attr, param, regions, warn)


@torch.no_grad()
def _repair(module: nn.Module, attr: str, param: torch.Tensor, regions: list[Region], warn: bool) -> None:
    root = module.__dict__.get("_hft_root")
    model = root() if root is not None else None
    if warn and model is not None and any(type(m).__name__.startswith("FSDP") for m in model.modules()):
        from .errors import IntegrationError

        raise IntegrationError(sharded_message(f"{type(module).__name__}.{attr}"))
    # The regions' values win: they are what the optimizer updated.
    targets = {(r.param.dtype, r.param.device) for r in regions}
    if len(targets) == 1:
        dtype, device = targets.pop()
        if param.dtype != dtype or param.device != device:
            param.data = param.data.to(device=device, dtype=dtype)
    for region in regions:
        view = param.data[region.index]
        if region.param.data_ptr() != view.data_ptr() or region.param.stride() != view.stride():
            view.copy_(region.param.data)
            region.param.data = view
    if warn:
        logger.warning(
            "hft_plugin: the trainable regions of %s.%s no longer shared its storage (the model or its "
            "parameters were converted or copied after HFT was applied); they were linked again, keeping "
            "their values. Apply HFT after converting the model to avoid this.", type(module).__name__, attr,
        )


# -- rows: nn.Linear and transformers' Conv1D ------------------------------------------------------


@dataclasses.dataclass
class RowsSpec:
    """What a partly trained Linear/Conv1D needs in backward: per region, its output and input
    ranges (Linear orientation: weight (out, in)) or, for a bias, its output range."""

    conv1d: bool
    weight: list[tuple[int, int, int, int]]  # (out_start, out_stop, in_start, in_stop) per weight region
    bias: list[tuple[int, int]]  # (out_start, out_stop) per bias region
    names: list[str]  # the region parameters' names on the module: weight regions, then bias regions


def rows_spec(module: nn.Module, conv1d: bool) -> RowsSpec:
    state = module_regions(module)
    out_features = module.weight.shape[1 if conv1d else 0]
    in_features = module.weight.shape[0 if conv1d else 1]
    weight, bias, names = [], [], []
    for region in state.get("weight", ()):
        ranges = {0: (0, module.weight.shape[0]), 1: (0, module.weight.shape[1])}
        for dim, start, stop in region.box:
            ranges[dim] = (start, stop)
        out_range, in_range = (ranges[1], ranges[0]) if conv1d else (ranges[0], ranges[1])
        assert out_range[1] <= out_features and in_range[1] <= in_features
        weight.append((*out_range, *in_range))
        names.append(region.name)
    for region in state.get("bias", ()):
        (_, start, stop), = region.box
        bias.append((start, stop))
        names.append(region.name)
    return RowsSpec(conv1d, weight, bias, names)


def _autocast_state(device_type: str) -> tuple:
    if torch.is_autocast_enabled(device_type):
        return (True, torch.get_autocast_dtype(device_type))
    return (False, None)


class RowsFunction(torch.autograd.Function):
    """``nn.Linear`` (``F.linear(x, W, b)``) or ``Conv1D`` (``addmm(b, x, W)``) whose weight and
    bias train only in regions: the forward is the module's own op on the full tensors (so outputs
    are bit-identical, ``P``'s storage holds the regions' values); the backward computes the input
    gradient in full and, for the weight, only the regions' blocks (one matmul per region, on the
    output columns of the upstream gradient and the input columns of the layer's input).
    Whole-trainable weights or biases (``requires_grad``) get their full gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, spec: RowsSpec, *regions):
        ctx.spec = spec
        ctx.region_dtypes = [r.dtype for r in regions]
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x, weight, bias)
        if spec.conv1d:
            out = torch.addmm(bias, x.view(-1, x.size(-1)), weight) if bias is not None \
                else x.view(-1, x.size(-1)).mm(weight)
            return out.view(x.size()[:-1] + (weight.shape[1],))
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        spec: RowsSpec = ctx.spec
        enabled, dtype = ctx.autocast
        with torch.autocast(x.device.type, dtype=dtype, enabled=enabled) if enabled else contextlib.nullcontext():
            return _rows_backward(ctx, spec, x, weight, bias, grad_out)


def _rows_backward(ctx, spec: RowsSpec, x, weight, bias, grad_out):
    needs = ctx.needs_input_grad
    gy = grad_out.reshape(-1, grad_out.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    grad_x = grad_w = grad_b = None
    if needs[0]:
        grad_x = (gy.mm(weight.t()) if spec.conv1d else gy.mm(weight)).view(x.shape)
    if needs[1]:
        grad_w = x2.t().mm(gy) if spec.conv1d else gy.t().mm(x2)
    if needs[2]:
        grad_b = gy.sum(0)
    grads = []
    dtypes = ctx.region_dtypes
    for (o0, o1, i0, i1), dtype in zip(spec.weight, dtypes):
        g = x2[:, i0:i1].t().mm(gy[:, o0:o1]) if spec.conv1d else gy[:, o0:o1].t().mm(x2[:, i0:i1])
        grads.append(g if g.dtype == dtype else g.to(dtype))
    if spec.bias:
        summed = grad_b if grad_b is not None else gy.sum(0)
        for (o0, o1), dtype in zip(spec.bias, dtypes[len(spec.weight):]):
            g = summed[o0:o1]
            grads.append(g if g.dtype == dtype else g.to(dtype))
    return (grad_x, grad_w, grad_b, None, *grads)


def _linear_forward(self, input):
    ensure_aliased(self)
    spec = self.__dict__["_hft_rows"]
    return RowsFunction.apply(input, self.weight, self.bias, spec, *(self._parameters[n] for n in spec.names))


def rows_module_kind(module: nn.Module) -> str | None:
    """"linear" or "conv1d" when ``module`` computes exactly ``nn.Linear`` or transformers'
    ``Conv1D`` (its class does not override their forward), else None."""
    forward = type(module).forward
    if isinstance(module, nn.Linear) and forward is nn.Linear.forward:
        return "linear"
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is installed wherever its models are
        return None
    if isinstance(module, Conv1D) and forward is Conv1D.forward:
        return "conv1d"
    return None


def install_rows(module: nn.Module) -> None:
    """Replace ``module``'s forward (on the instance) by one through :class:`RowsFunction`."""
    kind = rows_module_kind(module)
    module.__dict__["_hft_rows"] = rows_spec(module, kind == "conv1d")
    module.forward = types.MethodType(_linear_forward, module)


def uninstall_rows(module: nn.Module) -> None:
    module.__dict__.pop("_hft_rows", None)
    if isinstance(module.__dict__.get("forward"), types.MethodType) and \
            module.__dict__["forward"].__func__ is _linear_forward:
        del module.__dict__["forward"]
