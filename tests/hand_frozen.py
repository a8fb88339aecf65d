"""The same half frozen by hand, independent of hft_plugin's freezing machinery.

:class:`HandFrozen`: a copy of the model in which every tensor the selection freezes whole has
``requires_grad=False``, every tensor it trains whole keeps it, and every partly trained tensor is
rebuilt at each forward from leaf tensors (one per trainable box of the selection's plan, as a model
with separate matrices would have them) written into a constant copy of the frozen values, through
``torch.func.functional_call``. The optimizer and the gradient clipping see only the leaves and
the whole trainable tensors. Only the plan's boxes come from hft_plugin.

:func:`frozen_by_hand`: the same half frozen by hand as a plain module (per-tensor flags, the frozen
elements' gradients zeroed), for code that iterates the module itself (EMA, counters).
"""

from __future__ import annotations

import copy

import torch


def box_index(shape, box) -> tuple:
    index = [slice(None)] * len(shape)
    for dim, start, stop in box:
        index[dim] = slice(start, stop)
    return tuple(index)


class HandFrozen:
    def __init__(self, model: torch.nn.Module, plan):
        self.model = copy.deepcopy(model)
        params = dict(self.model.named_parameters())
        self.whole = []
        for name, param in params.items():
            param.requires_grad_(name in plan.trainable)
            if name in plan.trainable:
                self.whole.append(param)
        self.consts: dict[str, torch.Tensor] = {}
        self.leaves: dict[str, list[tuple[tuple, torch.nn.Parameter]]] = {}
        for name, boxes in plan.partial.items():
            full = params[name].detach().clone()
            self.consts[name] = full
            self.leaves[name] = [
                (box_index(full.shape, box), torch.nn.Parameter(full[box_index(full.shape, box)].clone()))
                for box in boxes
            ]

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.whole + [leaf for pieces in self.leaves.values() for _, leaf in pieces]

    def assembled(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, pieces in self.leaves.items():
            tensor = self.consts[name].clone()
            for index, leaf in pieces:
                tensor[index] = leaf  # differentiable: the leaf gets exactly its slice's gradient
            out[name] = tensor
        return out

    def __call__(self, **batch):
        return torch.func.functional_call(self.model, self.assembled(), args=(), kwargs=batch)

    def weights(self) -> dict[str, torch.Tensor]:
        """Every parameter's current value, partly trained tensors assembled."""
        values = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        values.update({n: t.detach() for n, t in self.assembled().items()})
        return values


def frozen_mask(shape, boxes, device="cpu") -> torch.Tensor:
    """True on the elements of a tensor of ``shape`` that none of the trainable ``boxes`` covers."""
    frozen = torch.ones(tuple(shape), dtype=torch.bool, device=device)
    for box in boxes:
        frozen[box_index(frozen.shape, box)] = False
    return frozen


def frozen_by_hand(model: torch.nn.Module, plan) -> torch.nn.Module:
    """A copy of ``model`` with the half that ``plan`` freezes frozen by hand, as a plain module
    that code outside the plugin can iterate, copy and average (EMA, counters).

    ``requires_grad`` is per tensor, so a partly trained tensor keeps ``requires_grad=True`` as a
    whole; a gradient hook zeroes its frozen elements' gradient at every backward (so clipping sees
    the trained half's norm). With an elementwise optimizer without weight decay (SGD with or without
    momentum, AdamW with ``weight_decay=0``) a zero gradient leaves an element bit-identical, so the
    frozen elements stay still and the trained ones move as the same half frozen by hand would. The
    optimizer must own ``[p for p in copy.parameters() if p.requires_grad]``.
    """
    copied = copy.deepcopy(model)
    params = dict(copied.named_parameters())
    for name, param in params.items():
        param.requires_grad_(name not in plan.frozen)
    for name, boxes in plan.partial.items():
        frozen = frozen_mask(params[name].shape, boxes, params[name].device)
        params[name].register_hook(lambda grad, frozen=frozen: grad.masked_fill(frozen, 0))
    return copied
