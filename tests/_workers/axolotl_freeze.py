"""Freeze tiny models with Axolotl's own ``freeze_layers_except`` and record what trains.

    python tests/_workers/axolotl_freeze.py CASES.json OUT.pt

Runs where ``axolotl.utils.freeze`` imports (Axolotl installed, or ``--no-deps`` into a folder on
PYTHONPATH: that module needs only torch, accelerate and transformers). For each case (family and
``unfrozen_parameters`` patterns) it records, per parameter, ``requires_grad`` and which elements
receive a gradient (a gradient of ones sent through the parameter's own hooks, where Axolotl's row
ranges act), then trains a copy a few SGD steps and keeps the weights before and after.
"""

from __future__ import annotations

import json
import sys

import torch


def main(cases_file: str, out_file: str) -> None:
    from axolotl.utils.freeze import freeze_layers_except

    from hft_plugin.testing import snapshot, tiny_model
    from tests.helpers import train_steps

    with open(cases_file) as f:
        cases = json.load(f)
    results = {}
    for key, case in cases.items():
        model = tiny_model(case["family"])
        freeze_layers_except(model, case["patterns"])
        masks = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.backward(torch.ones_like(param))  # through Axolotl's gradient hook, if any
                masks[name] = param.grad != 0
                param.grad = None
            else:
                masks[name] = torch.zeros_like(param, dtype=torch.bool)
        before = snapshot(model)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        torch.manual_seed(0)  # the same dropout masks as the HFT run it is compared with
        train_steps(model, optimizer, steps=3)
        results[key] = {"masks": masks, "before": before, "after": snapshot(model)}
    torch.save(results, out_file)


if __name__ == "__main__":
    main(*sys.argv[1:3])
