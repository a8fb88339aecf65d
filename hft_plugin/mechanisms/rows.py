"""The ``rows`` mechanism: ``nn.Linear`` and transformers' ``Conv1D`` weights and biases trained in part.

The optimizer owns the trainable boxes as region parameters (:mod:`hft_plugin.regions`), and the
module's forward runs through :class:`RowsFunction`, whose backward computes the weight gradient of
the trainable rows (columns) only: a frozen box's weight gradient is never formed.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from ..boxes import bounds
from ..regions import PartialTensor, install_forward

if TYPE_CHECKING:
    from . import Candidate

NAME = "rows"


def matches(tensor: "Candidate") -> bool:
    """The weight or bias of a module that computes exactly ``nn.Linear`` or ``Conv1D``."""
    return tensor.blocked is None and tensor.attr in ("weight", "bias") and rows_module_kind(tensor.module) is not None


def why_not(tensor: "Candidate") -> str | None:
    return None  # a module rows does not take is named as it is by the mask


def regions(tensor: "Candidate", root: nn.Module) -> PartialTensor:
    """The region parameters of ``tensor``, one per trainable box."""
    return PartialTensor(tensor.module, tensor.attr, tensor.name, tensor.boxes, squeeze_leading=False, root=root)


def install(module: nn.Module, partials: Sequence[PartialTensor]) -> None:
    """Run ``module``'s forward through :class:`RowsFunction` (on the instance)."""
    spec = rows_spec(module, rows_module_kind(module) == "conv1d", partials)
    install_forward(module, partials, rows_forward, spec)


def rows_spec(module: nn.Module, conv1d: bool, partials: Sequence[PartialTensor]) -> tuple:
    """What a partly trained Linear/Conv1D needs in backward, as constants (hashable, so
    ``torch.compile`` treats them as such): (conv1d, weight regions as (out_start, out_stop,
    in_start, in_stop) in Linear orientation, bias regions as (out_start, out_stop))."""
    by_attr = {p.attr: p for p in partials}
    shape = module.weight.shape
    weight, bias = [], []
    for region in by_attr["weight"].regions if "weight" in by_attr else ():
        rows, columns = bounds(shape, region.box)
        out_range, in_range = (columns, rows) if conv1d else (rows, columns)
        weight.append((*out_range, *in_range))
    for region in by_attr["bias"].regions if "bias" in by_attr else ():
        (start, stop), = bounds(module.bias.shape, region.box)
        bias.append((start, stop))
    return (conv1d, tuple(weight), tuple(bias))


class RowsFunction(torch.autograd.Function):
    """``nn.Linear`` (``F.linear(x, W, b)``) or ``Conv1D`` (``addmm(b, x, W)``) whose weight and
    bias train only in boxes: the forward is the module's own op on the full tensors (outputs are
    bit-identical); the backward computes the input gradient in full and, for the weight and bias,
    a full-shape gradient that is zero outside the trainable boxes, computing only the boxes (one
    matmul per box, on the output columns of the upstream gradient and the input columns of the
    layer's input).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, spec: tuple):
        ctx.spec = spec
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x, weight, bias)
        if spec[0]:
            out = torch.addmm(bias, x.view(-1, x.size(-1)), weight) if bias is not None \
                else x.view(-1, x.size(-1)).mm(weight)
            return out.view(x.size()[:-1] + (weight.shape[1],))
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        enabled, dtype = ctx.autocast
        # The backward runs under the forward's autocast (as the module's own backward would compute in
        # its dtypes): a bf16 input and an fp32 weight meet in the matmuls.
        with torch.autocast(grad_out.device.type, dtype=dtype, enabled=enabled) if enabled else contextlib.nullcontext():
            return RowsFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        conv1d, weight_boxes, bias_boxes = ctx.spec
        needs = ctx.needs_input_grad
        gy = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_w = grad_b = None
        if needs[0]:
            grad_x = (gy.mm(weight.t()) if conv1d else gy.mm(weight)).view(x.shape)
        if needs[1]:
            if weight_boxes:
                grad_w = torch.zeros_like(weight)
                for o0, o1, i0, i1 in weight_boxes:
                    if conv1d:
                        grad_w[i0:i1, o0:o1] = x2[:, i0:i1].t().mm(gy[:, o0:o1])
                    else:
                        grad_w[o0:o1, i0:i1] = gy[:, o0:o1].t().mm(x2[:, i0:i1])
            else:  # trains whole
                grad_w = x2.t().mm(gy) if conv1d else gy.t().mm(x2)
        if needs[2]:
            grad_b = gy.sum(0)  # one reduction (the order of the bias gradient without HFT), then the boxes kept
            if bias_boxes:
                kept = torch.zeros_like(grad_b)
                for o0, o1 in bias_boxes:
                    kept[o0:o1] = grad_b[o0:o1]
                grad_b = kept
        return grad_x, grad_w, grad_b, None


def _autocast_state(device_type: str) -> tuple:
    if torch.is_autocast_enabled(device_type):
        return (True, torch.get_autocast_dtype(device_type))
    return (False, None)


def rows_forward(module: nn.Module, spec: tuple, input: torch.Tensor) -> torch.Tensor:
    return RowsFunction.apply(input, module.weight, module.bias, spec)


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
