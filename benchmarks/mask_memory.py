"""Peak host memory of masking one large expert stack: the mask mechanism's set-up, ``mask_gradients``
and DeepSpeed ZeRO's gradient hooks.

A one-layer Mixtral-shaped model on the meta device (its weights cost nothing): 64 experts,
``gate_up_proj`` of shape (64, 2048, 768), every partly trained tensor through the mask mechanism
(``partial="mask"``, as under ZeRO), the category strategy training half of each stack. A thread
samples the RSS during each step; the table gives the peak rise in the step and what stays held.

    python benchmarks/mask_memory.py
    PYTHONPATH=/path/to/other/checkout python benchmarks/mask_memory.py   # another version
"""

from __future__ import annotations

import os
import threading
import time

import torch
from transformers import MixtralConfig, MixtralForCausalLM

import hft_plugin
from hft_plugin import apply_selection, select_half

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Peak:
    """The RSS before, at its highest during, and after a ``with`` block (sampled every 0.2 ms)."""

    def __enter__(self) -> "Peak":
        self.start = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.0002)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())
        self.end = rss()


def main() -> None:
    from hft_plugin.zero import ZeroGradientMasks

    config = MixtralConfig(hidden_size=768, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=12,
                           num_key_value_heads=4, num_local_experts=64, num_experts_per_tok=2, vocab_size=256)
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    handle = apply_selection(model, select_half(model, round=0, strategy="category"), partial="mask")
    stack = "model.layers.0.mlp.experts.gate_up_proj"
    masked = handle.masked_parameters
    print(f"{hft_plugin.__file__}: {stack} {tuple(masked[stack].shape)}, "
          f"{len(handle.selection.plan().partial[stack])} trained boxes; masked tensors: {len(masked)}")
    optimizer = torch.optim.SGD([masked[stack]], lr=0.1)  # an optimizer over the stack alone: attach masks it
    steps = [("attach (SGD)", lambda: handle.attach(optimizer, restore=False)),
             ("mask_gradients", handle.mask_gradients),
             ("ZeRO gradient hooks", lambda: ZeroGradientMasks().install(handle))]
    base = rss()
    lines = ["| step | peak rise (MiB) | held since the first step (MiB) |", "|---|---|---|"]
    for name, step in steps:
        with Peak() as p:
            step()
        lines.append(f"| {name} | {(p.peak - p.start) / MIB:.1f} | {(p.end - base) / MIB:.1f} |")
    table = "\n".join(lines)
    print(table)
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, "mask_memory.md"), "w") as f:
        f.write("# Host memory of masking one 64-expert stack\n\n"
                f"`python benchmarks/mask_memory.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
                f"torch {torch.__version__}: {stack} of shape {tuple(masked[stack].shape)} on the meta device, "
                "half trained, partial=\"mask\". Before boxes-first masking (bba0e96) the same steps rose by "
                "195, 240 and 192 MiB.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
