"""How close select_half lands to the requested ratio, per family and strategy, and how fast it is.

    python benchmarks/selection.py            # writes benchmarks/results/selection.md and .json

Every model is built from its family's default (full-size) transformers config on the meta device,
so no weights exist; the time is select_half's alone (the layout read included), best of 3.
"""

from __future__ import annotations

import json
import pathlib
import platform
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from hft_plugin import select_half
from hft_plugin.testing import TINY_CONFIGS

RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
STRATEGIES = ["category", "layer", "model"]
RESULTS = pathlib.Path(__file__).parent / "results"

# Llama 3.1 405B's published shape.
LLAMA_405B = dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                  num_key_value_heads=8, vocab_size=128256)


def meta(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def best_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    rows = []
    for family in sorted(TINY_CONFIGS):
        model = meta(AutoConfig.for_model(family))
        for strategy in STRATEGIES:
            shares = [select_half(model, strategy=strategy, ratio=r).trainable_ratio for r in RATIOS]
            rows.append({"family": family, "strategy": strategy, "layers": len(select_half(model).layout.layers),
                         "shares": shares, "max_error_pp": 100 * max(abs(s - r) for s, r in zip(shares, RATIOS))})
    big = meta(LlamaConfig(**LLAMA_405B))
    timing = {
        "model": "Llama-3.1-405B config, meta device",
        "params": sum(p.numel() for p in big.parameters()),
        "round0_s": best_time(lambda: select_half(big, 0)),
        "round3_s": best_time(lambda: select_half(big, 3)),
        "share": select_half(big).trainable_ratio,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "selection.json").write_text(json.dumps({"rows": rows, "timing": timing, "machine": platform.platform()}, indent=1))
    lines = ["# select_half: trainable share of the layers' parameters against the requested ratio", "",
             "Default (full-size) transformers configs on the meta device. Command: `python benchmarks/selection.py`.", "",
             "| family | layers | strategy | " + " | ".join(f"{r:g}" for r in RATIOS) + " | max error (pp) |",
             "|---|---|---|" + "---|" * len(RATIOS) + "---|"]
    for row in rows:
        lines.append(f"| {row['family']} | {row['layers']} | {row['strategy']} | "
                     + " | ".join(f"{s:.4f}" for s in row["shares"]) + f" | {row['max_error_pp']:.2f} |")
    lines += ["", f"select_half on the {timing['model']} ({timing['params'] / 1e9:.0f}B parameters): "
              f"round 0 {timing['round0_s']:.3f} s, round 3 {timing['round3_s']:.3f} s (best of 3), share {timing['share']:.4f}.",
              "", f"Machine: {platform.platform()}, {torch.get_num_threads()} threads; other jobs were running."]
    (RESULTS / "selection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
