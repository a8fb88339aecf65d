"""Stacked Mixture-of-Experts tensors trained in part, through transformers' ``ExpertsInterface``.

transformers 5 stores a layer's experts stacked (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I),
optional biases, or their transposes) in a module whose class is decorated with
``use_experts_implementation``: its forward dispatches to the function that
``config._experts_implementation`` names in ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``
(``eager``, ``grouped_mm``, ``batched_mm``, ...). HFT registers one more, ``"hft"``, and switches the
config of a model whose experts train in part to it (and back on ``remove()``); no model class or
forward is patched.

For a module with region parameters (:mod:`hft_plugin.regions`), ``"hft"`` computes what
transformers' ``grouped_mm`` implementation computes: sort the (token, expert) pairs by expert, the
up (or gate-up) projection, ``module._apply_gate`` (or the activation), the down projection, the
routing weights, unsort. Each stacked projection goes through :class:`ExpertsLinearFunction`, whose
forward is transformers' own grouped matmul (outputs bit-identical to ``grouped_mm``) and whose
backward computes the input gradient through the same grouped matmul and the weight gradient only
for the trainable regions (one matmul per region over the tokens routed to its expert): a frozen
expert's weight gradient is never formed. A region whose expert got no tokens gets a zero gradient
(not None: DDP expects one). Modules of the model without regions run the configured
implementation unchanged.

Implementations HFT does not reproduce (``deepgemm``, ``sonicmoe``, a custom registration) and
expert-parallel modules keep the gradient-mask mechanism (:mod:`hft_plugin.masking`).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any, Callable

import torch
from torch import nn

from .regions import ensure_aliased, module_regions

IMPLEMENTATION = "hft"
# Implementations whose computation "hft" reproduces (None: a module used outside a model, eager).
REPRODUCIBLE = frozenset({None, "eager", "grouped_mm", "batched_mm"})
STACKED = ("gate_up_proj", "up_proj", "down_proj")

# id(config) -> (weak reference to it, its configured implementation); configs are not hashable
_BASES: dict[int, tuple[weakref.ref, str | None]] = {}
_STATE = "_hft_experts"


def is_experts_module(module: nn.Module) -> bool:
    """True for a module whose class transformers decorated with ``use_experts_implementation``."""
    forward = getattr(type(module), "forward", None)
    return (hasattr(module, "has_gate") and hasattr(module, "is_transposed") and hasattr(module, "config")
            and getattr(forward, "__wrapped__", None) is not None)


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


def _configured(module: nn.Module) -> str | None:
    implementation = getattr(module.config, "_experts_implementation", None)
    if implementation == IMPLEMENTATION:
        return module.__dict__.get("_hft_experts_base", _remembered(module.config))
    return implementation


def _remembered(config: Any) -> str | None:
    ref, base = _BASES.get(id(config), (None, "grouped_mm"))
    return base if ref is None or ref() is config else "grouped_mm"


# -- switching a module to "hft" and back ---------------------------------------------------------


@dataclasses.dataclass
class _Projection:
    """The regions of one stacked projection (its weight and bias), in Linear orientation."""

    transposed: bool
    weight: list[tuple[int, int, int, int, int]]  # (expert, out_start, out_stop, in_start, in_stop)
    bias: list[tuple[int, int, int]]  # (expert, out_start, out_stop)
    names: list[str]  # the region parameters' names on the module: weight regions, then bias regions


def install(module: nn.Module) -> Any:
    """Route ``module`` through the "hft" implementation; returns its config, switched."""
    _register()
    config = module.config
    regions = module_regions(module)
    projections = {}
    for name in STACKED:
        if name not in regions and f"{name}_bias" not in regions:
            continue
        weight = module._parameters.get(name)
        transposed = bool(module.is_transposed)
        spec = _Projection(transposed, [], [], [])
        for region in regions.get(name, ()):
            ranges = {1: (0, weight.shape[1]), 2: (0, weight.shape[2])}
            expert = None
            for dim, start, stop in region.box:
                if dim == 0:
                    expert = start
                else:
                    ranges[dim] = (start, stop)
            out_range, in_range = (ranges[2], ranges[1]) if transposed else (ranges[1], ranges[2])
            spec.weight.append((expert, *out_range, *in_range))
            spec.names.append(region.name)
        for region in regions.get(f"{name}_bias", ()):
            bias = module._parameters[f"{name}_bias"]
            expert, out_range = None, (0, bias.shape[1])
            for dim, start, stop in region.box:
                if dim == 0:
                    expert = start
                else:
                    out_range = (start, stop)
            spec.bias.append((expert, *out_range))
            spec.names.append(region.name)
        projections[name] = spec
    module.__dict__[_STATE] = projections
    base = _configured(module)
    module.__dict__["_hft_experts_base"] = base
    if config._experts_implementation != IMPLEMENTATION:
        _BASES[id(config)] = (weakref.ref(config), base)
        config._experts_implementation_internal = IMPLEMENTATION
    return config


def uninstall(module: nn.Module) -> None:
    module.__dict__.pop(_STATE, None)
    module.__dict__.pop("_hft_experts_base", None)


def restore(config: Any) -> None:
    """Put ``config``'s configured implementation back."""
    ref, base = _BASES.get(id(config), (None, None))
    if ref is not None and ref() is config:
        del _BASES[id(config)]
        if getattr(config, "_experts_implementation", None) == IMPLEMENTATION:
            config._experts_implementation_internal = base


def _register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, hft_experts_forward)


def _base_function(module: nn.Module) -> Callable:
    base = _configured(module)
    if base in (None, "eager"):
        return type(module).forward.__wrapped__
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ALL_EXPERTS_FUNCTIONS[base]


# -- the computation -----------------------------------------------------------------------------


def hft_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """The "hft" experts implementation (registered in ``ALL_EXPERTS_FUNCTIONS``)."""
    projections = self.__dict__.get(_STATE)
    if not projections:
        return _base_function(self)(self, hidden_states, top_k_index, top_k_weights)
    ensure_aliased(self)
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
    if self.has_post_expert_norm:
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
    return ExpertsLinearFunction.apply(x, weight, bias, offsets, expert_ids, spec,
                                       *(module._parameters[n] for n in spec.names))


class ExpertsLinearFunction(torch.autograd.Function):
    """One stacked projection of the experts (x (S, in) sorted by expert, ``offsets`` the cumulative
    token counts) whose weight and bias train only in regions.

    Forward: transformers' grouped linear on the full stacked tensors. Backward: the input gradient
    through the same grouped matmul; for each region, its expert's tokens' ``gy[:, out].T @ x[:, in]``
    (``x[:, in].T @ gy[:, out]`` for transposed weights); whole-trainable weights and biases their
    full gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, offsets, expert_ids, spec: _Projection, *regions):
        ctx.spec = spec
        ctx.regions = [(r.shape, r.dtype) for r in regions]
        ctx.save_for_backward(x, weight, offsets)
        ctx.bias_shape = None if bias is None else bias.shape
        return _grouped_linear(x, weight, offsets, None if bias is None else bias[expert_ids], spec.transposed)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, offsets = ctx.saved_tensors
        spec: _Projection = ctx.spec
        needs = ctx.needs_input_grad
        gy = grad_out.to(weight.dtype)
        xw = x.to(weight.dtype)
        bounds = [0, *offsets.tolist()]  # one host sync, as transformers' own fallback
        grad_x = grad_w = grad_b = None
        if needs[0]:
            grad_x = _grouped_mm(gy, weight.transpose(-2, -1) if spec.transposed else weight, offsets).to(x.dtype)
        if needs[1]:
            grad_w = torch.zeros_like(weight)
            for e in range(weight.shape[0]):
                s, t = bounds[e], bounds[e + 1]
                if s < t:
                    grad_w[e] = xw[s:t].t().mm(gy[s:t]) if spec.transposed else gy[s:t].t().mm(xw[s:t])
        if needs[2]:
            grad_b = torch.zeros(ctx.bias_shape, dtype=gy.dtype, device=gy.device)
            for e in range(ctx.bias_shape[0]):
                grad_b[e] = gy[bounds[e]:bounds[e + 1]].sum(0)
        grads = []
        for (e, o0, o1, i0, i1), (shape, dtype) in zip(spec.weight, ctx.regions):
            s, t = bounds[e], bounds[e + 1]
            if s == t:
                grads.append(torch.zeros(shape, dtype=dtype, device=gy.device))
                continue
            g = xw[s:t, i0:i1].t().mm(gy[s:t, o0:o1]) if spec.transposed else gy[s:t, o0:o1].t().mm(xw[s:t, i0:i1])
            grads.append(g if g.dtype == dtype else g.to(dtype))
        for (e, o0, o1), (_, dtype) in zip(spec.bias, ctx.regions[len(spec.weight):]):
            g = gy[bounds[e]:bounds[e + 1], o0:o1].sum(0)
            grads.append(g if g.dtype == dtype else g.to(dtype))
        return (grad_x, grad_w, grad_b, None, None, None, *grads)


@functools.lru_cache(maxsize=None)
def _transformers_moe(name: str) -> Callable | None:
    """A helper of transformers' MoE integration, or None where this transformers lacks it; looked up
    once, not at every projection of every forward and backward."""
    try:
        import transformers.integrations.moe as moe
    except ImportError:
        return None
    return getattr(moe, name, None)


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
