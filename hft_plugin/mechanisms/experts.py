"""The ``experts`` mechanism: stacked Mixture-of-Experts tensors trained in part.

transformers 5 stores a layer's experts stacked (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I),
optional biases, or their transposes) in a module whose class is decorated with
``use_experts_implementation``: its forward dispatches to the function that
``config._experts_implementation`` names in ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``
(``eager``, ``grouped_mm``, ``batched_mm``, ...).

For a module whose stacked tensors train in part (region parameters, :mod:`hft_plugin.regions`),
HFT installs a forward on that module instance (:class:`~hft_plugin.regions.HFTForward`) that
computes what transformers' ``grouped_mm`` implementation computes: sort the (token, expert) pairs
by expert, the up (or gate-up) projection, ``module._apply_gate`` (or the activation), the down
projection, the routing weights, unsort. Each stacked projection goes through
:class:`ExpertsLinearFunction`, whose forward is transformers' own grouped matmul (outputs
bit-identical to ``grouped_mm``) and whose backward computes the input gradient through the same
grouped matmul and the weight gradient only for the trainable regions (one matmul per region over
the tokens routed to its expert), zero elsewhere: a frozen expert's weight gradient is never formed.

The model's config, transformers' registry of implementations and the model class are left as they
are, so copies, pickles and ``save_pretrained`` see the user's configuration, and nothing global
needs undoing. A module whose configured implementation is switched after HFT was applied runs that
implementation (its full weight gradient: still exact, since the optimizer owns only the regions).
Implementations HFT does not reproduce (``deepgemm``, ``sonicmoe``, a custom registration),
expert-parallel modules and regions that span several experts keep the gradient-mask mechanism
(:mod:`hft_plugin.mechanisms.mask`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn

from ..boxes import bounds, fixes_one
from ..regions import PartialTensor, install_forward

if TYPE_CHECKING:
    from . import Candidate

NAME = "experts"

# Implementations whose computation HFT reproduces (None: a module used outside a model, eager).
REPRODUCIBLE = frozenset({None, "eager", "grouped_mm", "batched_mm"})
STACKED = ("gate_up_proj", "up_proj", "down_proj")


def is_experts_module(module: nn.Module) -> bool:
    """True for a module whose class transformers decorated with ``use_experts_implementation``."""
    forward = getattr(type(module), "forward", None)
    return (hasattr(module, "has_gate") and hasattr(module, "is_transposed") and hasattr(module, "config")
            and getattr(forward, "__wrapped__", None) is not None)


def _configured(module: nn.Module) -> str | None:
    return getattr(module.config, "_experts_implementation", None)


def unsupported_reason(module: nn.Module, attr: str) -> str | None:
    """Why ``module.<attr>`` cannot use the experts mechanism, or None if it can."""
    if not is_experts_module(module):
        return "not a transformers experts module"
    base = _configured(module)
    if base not in REPRODUCIBLE:
        return f"experts implementation {base!r}"
    if getattr(module, "_is_expert_parallel", False):
        return "expert-parallel"
    if attr.removesuffix("_bias") not in STACKED:
        return f"{attr} is not a stacked expert tensor"
    return None


def matches(tensor: "Candidate") -> bool:
    """A stacked tensor of a transformers experts module whose computation HFT reproduces, each
    trainable box inside one expert."""
    return tensor.blocked is None and is_experts_module(tensor.module) and why_not(tensor) is None


def why_not(tensor: "Candidate") -> str | None:
    """Why a tensor of a transformers experts module cannot use this mechanism (None for any other
    module: it is not this mechanism's to refuse)."""
    if tensor.module is None or not is_experts_module(tensor.module):
        return None
    why = unsupported_reason(tensor.module, tensor.attr)
    if why is None and not all(fixes_one(box) for box in tensor.boxes):
        why = "a region spans several experts"
    return why


def regions(tensor: "Candidate", root: nn.Module) -> PartialTensor:
    """The region parameters of ``tensor``, one per trainable box, each indexing its expert with an int."""
    return PartialTensor(tensor.module, tensor.attr, tensor.name, tensor.boxes, squeeze_leading=True, root=root)


def experts_spec(module: nn.Module, partials: Sequence[PartialTensor]) -> tuple:
    """Per stacked projection with regions, as constants (hashable, so ``torch.compile`` treats them
    as such): (name, transposed, weight regions as (expert, out_start, out_stop, in_start, in_stop)
    in Linear orientation, bias regions as (expert, out_start, out_stop))."""
    by_attr = {p.attr: p for p in partials}
    transposed = bool(module.is_transposed)
    spec = []
    for name in STACKED:
        if name not in by_attr and f"{name}_bias" not in by_attr:
            continue
        weights, biases = [], []
        if name in by_attr:
            shape = module._parameters[name].shape
            for region in by_attr[name].regions:
                (expert, _), rows, columns = bounds(shape, region.box)  # each box is one expert's
                out_range, in_range = (columns, rows) if transposed else (rows, columns)
                weights.append((expert, *out_range, *in_range))
        if f"{name}_bias" in by_attr:
            shape = module._parameters[f"{name}_bias"].shape
            for region in by_attr[f"{name}_bias"].regions:
                (expert, _), out_range = bounds(shape, region.box)
                biases.append((expert, *out_range))
        spec.append((name, transposed, tuple(weights), tuple(biases)))
    return tuple(spec)


def install(module: nn.Module, partials: Sequence[PartialTensor]) -> None:
    """Run ``module``'s experts through :func:`hft_experts_forward` (on the instance)."""
    install_forward(module, partials, hft_experts_forward, experts_spec(module, partials))


# -- the computation -----------------------------------------------------------------------------


def hft_experts_forward(self: nn.Module, spec: tuple, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts of ``self`` as transformers' ``grouped_mm`` computes them, with the weight
    gradient of the regions in ``spec`` only (:func:`experts_spec`)."""
    if _configured(self) not in REPRODUCIBLE:  # switched after HFT was applied: its own computation
        return type(self).forward(self, hidden_states, top_k_index, top_k_weights)
    projections = {name: (transposed, weights, biases) for name, transposed, weights, biases in spec}
    device = hidden_states.device
    num_top_k = top_k_index.size(-1)
    num_tokens = hidden_states.size(0)
    hidden_dim = hidden_states.size(-1)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    selected = hidden_states[perm // num_top_k]
    sample_weights_g = sample_weights[perm]
    histc_input = expert_ids_g.float() if device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(histc_input, bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)

    up = "gate_up_proj" if self.has_gate else "up_proj"
    out = _project(self, projections, up, selected, offsets, expert_ids_g)
    out = self._apply_gate(out) if self.has_gate else self.act_fn(out)
    out = _project(self, projections, "down_proj", out, offsets, expert_ids_g)
    if getattr(self, "has_post_expert_norm", False):  # transformers < 5.20 has no such attribute (nor norm)
        out = self.post_expert_norm(out)
    weighted = out * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=device)
    weighted = weighted[inv_perm]
    return weighted.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def _project(module, projections, name, x, offsets, expert_ids):
    weight = getattr(module, name)
    bias = getattr(module, f"{name}_bias") if module.has_bias else None
    spec = projections.get(name)
    if spec is None:
        return _grouped_linear(x, weight, offsets, None if bias is None else bias[expert_ids], bool(module.is_transposed))
    if torch.compiler.is_compiling():
        # The region-only backward needs the token counts on the host, which a graph cannot hold: under
        # torch.compile the projection's own backward runs, and its gradient is zeroed outside the regions.
        transposed, weight_regions, bias_regions = spec
        if weight_regions:
            weight = KeepRegions.apply(weight, tuple((e, *((i0, i1, o0, o1) if transposed else (o0, o1, i0, i1)))
                                                      for e, o0, o1, i0, i1 in weight_regions))
        if bias is not None and bias_regions:
            bias = KeepRegions.apply(bias, bias_regions)
        return _grouped_linear(x, weight, offsets, None if bias is None else bias[expert_ids], transposed)
    return ExpertsLinearFunction.apply(x, weight, bias, offsets, expert_ids, spec)


class KeepRegions(torch.autograd.Function):
    """The identity, whose backward keeps the gradient inside ``boxes`` only (each box: a leading
    index, then a (start, stop) pair per further dimension) and zeroes the rest."""

    @staticmethod
    def forward(ctx, tensor, boxes: tuple):
        ctx.boxes = boxes
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        kept = torch.zeros_like(grad)
        for expert, *bounds in ctx.boxes:
            index = (expert, *(slice(bounds[i], bounds[i + 1]) for i in range(0, len(bounds), 2)))
            kept[index] = grad[index]
        return kept, None


class ExpertsLinearFunction(torch.autograd.Function):
    """One stacked projection of the experts (x (S, in) sorted by expert, ``offsets`` the cumulative
    token counts) whose weight and bias train only in regions.

    Forward: transformers' grouped linear on the full stacked tensors. Backward: the input gradient
    through the same grouped matmul; a full-shape weight (bias) gradient that is zero outside the
    regions, where each region gets its expert's tokens' ``gy[:, out].T @ x[:, in]``
    (``x[:, in].T @ gy[:, out]`` for transposed weights); a weight or bias that trains whole (no
    regions) its full gradient.

    ``spec``: (transposed, weight regions (expert, out_start, out_stop, in_start, in_stop), bias
    regions (expert, out_start, out_stop)).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, offsets, expert_ids, spec: tuple):
        ctx.spec = spec
        ctx.save_for_backward(x, weight, offsets)
        ctx.bias_shape = None if bias is None else bias.shape
        return _grouped_linear(x, weight, offsets, None if bias is None else bias[expert_ids], spec[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, offsets = ctx.saved_tensors
        transposed, weight_regions, bias_regions = ctx.spec
        needs = ctx.needs_input_grad
        gy = grad_out.to(weight.dtype)
        xw = x.to(weight.dtype)
        bounds = [0, *offsets.tolist()]  # one host sync, as transformers' own fallback
        grad_x = grad_w = grad_b = None
        if needs[0]:
            grad_x = _grouped_mm(gy, weight.transpose(-2, -1) if transposed else weight, offsets).to(x.dtype)
        if needs[1]:
            grad_w = torch.zeros_like(weight)
            if weight_regions:
                for e, o0, o1, i0, i1 in weight_regions:
                    s, t = bounds[e], bounds[e + 1]
                    if s == t:
                        continue
                    if transposed:
                        grad_w[e, i0:i1, o0:o1] = xw[s:t, i0:i1].t().mm(gy[s:t, o0:o1])
                    else:
                        grad_w[e, o0:o1, i0:i1] = gy[s:t, o0:o1].t().mm(xw[s:t, i0:i1])
            else:  # trains whole
                for e in range(weight.shape[0]):
                    s, t = bounds[e], bounds[e + 1]
                    if s < t:
                        grad_w[e] = xw[s:t].t().mm(gy[s:t]) if transposed else gy[s:t].t().mm(xw[s:t])
        if needs[2]:
            grad_b = torch.zeros(ctx.bias_shape, dtype=gy.dtype, device=gy.device)
            if bias_regions:
                for e, o0, o1 in bias_regions:
                    grad_b[e, o0:o1] = gy[bounds[e]:bounds[e + 1], o0:o1].sum(0)
            else:
                for e in range(ctx.bias_shape[0]):
                    grad_b[e] = gy[bounds[e]:bounds[e + 1]].sum(0)
        return grad_x, grad_w, grad_b, None, None, None


_MOE_HELPERS: dict[str, Callable | None] = {}


def _transformers_moe(name: str) -> Callable | None:
    """A helper of transformers' MoE integration, or None where this transformers lacks it; looked up
    once, not at every projection of every forward and backward (a plain dict, which torch.compile
    reads as it is)."""
    if name not in _MOE_HELPERS:
        try:
            import transformers.integrations.moe as moe
        except ImportError:
            moe = None
        _MOE_HELPERS[name] = getattr(moe, name, None)
    return _MOE_HELPERS[name]


def _grouped_linear(x, weight, offsets, bias, transposed: bool):
    grouped_linear = _transformers_moe("_grouped_linear")
    if grouped_linear is None:  # a transformers without it: the same computation, one matmul per expert
        out = _grouped_mm(x, weight if transposed else weight.transpose(-2, -1), offsets)
        if bias is not None:
            out.add_(bias)
        return out
    return grouped_linear(x, weight, offsets, bias=bias, is_transposed=transposed)


def _grouped_mm(x, weight, offsets):
    """x (S, K) sorted by expert times weight (E, K, N), expert by expert: transformers' dispatcher
    (``torch.nn.functional.grouped_mm`` where it can), else one matmul per expert."""
    grouped_mm = _transformers_moe("_grouped_mm")
    if grouped_mm is not None:
        return grouped_mm(x, weight, offsets)
    out = torch.zeros(x.size(0), weight.size(2), device=x.device, dtype=weight.dtype)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if start < end:
            out[start:end] = x[start:end].to(weight.dtype).mm(weight[e])
        start = end
    return out
