"""The same half frozen by hand, independent of hft_plugin's freezing machinery.

A copy of the model in which every tensor the selection freezes whole has ``requires_grad=False``,
every tensor it trains whole keeps it, and every partly trained tensor is rebuilt at each forward
from leaf tensors (one per trainable box of the selection's plan, as a model with separate
matrices would have them) written into a constant copy of the frozen values, through
``torch.func.functional_call``. The optimizer and the gradient clipping see only the leaves and
the whole trainable tensors. Only the plan's boxes come from hft_plugin.
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
