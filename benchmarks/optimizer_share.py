"""What the optimizer owns under HFT, for every model type of the zoo that has partly trained tensors.

For each causal-LM type of the installed transformers: build the default config on the meta device
(as benchmarks/zoo.py does: no weights exist), select round 0 (category, ratio 0.5), and apply it
twice, each time on a fresh meta model:

* ``mask``: ``apply_selection(model, selection, partial="mask")``, the mechanism every partly
  trained tensor used before region parameters (the optimizer owns such a tensor whole);
* ``auto``: the default (region parameters where they apply: ``rows``, ``experts``; the mask
  elsewhere).

A row reports the trainable share (trainable elements over all elements), the share of all
elements the optimizer owns under each (``sum(p.numel() for p in handle.parameters())`` over all
parameters), and how many partly trained tensors use each mechanism. Types without partly trained
tensors (the optimizer owns exactly the trainable share either way) are counted, not listed.

    python benchmarks/optimizer_share.py                 # the whole zoo
    python benchmarks/optimizer_share.py mixtral phi3    # some types

Results: benchmarks/results/optimizer_share.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from zoo import build_meta, zoo_types  # noqa: E402

RESULTS = os.path.join(HERE, "results")


def probe(model_type: str) -> dict[str, Any]:
    from hft_plugin import apply_selection, select_half

    row: dict[str, Any] = {"model_type": model_type}
    try:
        model = build_meta(model_type)
    except Exception as exc:  # a default config that does not build: not part of the zoo
        row.update(status="unbuildable", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        return row
    try:
        selection = select_half(model, 0)
    except Exception as exc:
        row.update(status="unread", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        return row
    total = sum(p.numel() for p in model.parameters())
    partial = selection.plan().partial
    row.update(status="ok", total=total, trainable_share=selection.stats()["trainable_params"] / total,
               partial_tensors=len(partial), layout=selection.layout_name)
    if not partial:
        return row
    for mode in ("mask", "auto"):
        fresh = model if mode == "mask" else build_meta(model_type)
        handle = apply_selection(fresh, selection, partial=mode)
        row[f"{mode}_owns"] = sum(p.numel() for p in handle.parameters()) / total
        counts: dict[str, int] = {}
        for mechanism in handle.mechanisms().values():
            counts[mechanism] = counts.get(mechanism, 0) + 1
        row[f"{mode}_mechanisms"] = counts
        if mode == "auto":
            row["auto_summary"] = handle.mechanism_summary()
        handle.remove()
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model_type | layout | partly trained tensors | trainable share | optimizer owns: mask (before) "
             "| optimizer owns: regions (now) | mechanisms now |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok" or not r["partial_tensors"]:
            continue
        mechanisms = ", ".join(f"{m} {n}" for m, n in sorted(r["auto_mechanisms"].items()))
        lines.append(f"| {r['model_type']} | {r['layout']} | {r['partial_tensors']} | {r['trainable_share']:.1%} "
                     f"| {r['mask_owns']:.1%} | {r['auto_owns']:.1%} | {mechanisms} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("types", nargs="*", help="model types (default: the whole zoo)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    rows = []
    for model_type in args.types or zoo_types():
        start = time.perf_counter()
        row = probe(model_type)
        row["seconds"] = round(time.perf_counter() - start, 2)
        rows.append(row)
        if row.get("partial_tensors"):
            print(f"{model_type:>24}: share {row['trainable_share']:.3f}  mask {row['mask_owns']:.3f}  "
                  f"now {row['auto_owns']:.3f}  {row['auto_mechanisms']}", flush=True)
    text = table(rows)
    ok = [r for r in rows if r.get("status") == "ok"]
    partial = [r for r in ok if r["partial_tensors"]]
    exact = [r for r in partial if abs(r["auto_owns"] - r["trainable_share"]) < 0.01]
    summary = (f"{len(ok)} types read; {len(partial)} have partly trained tensors; under region parameters the "
               f"optimizer owns the trainable share (within 1 point) in {len(exact)} of them.")
    print(text + "\n\n" + summary)
    if not args.no_write:
        os.makedirs(RESULTS, exist_ok=True)
        command = "python benchmarks/optimizer_share.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(os.path.join(RESULTS, "optimizer_share.json"), "w") as f:
            json.dump(dict(rows=rows, command=command, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())), f, indent=1)
        with open(os.path.join(RESULTS, "optimizer_share.md"), "w") as f:
            f.write(f"# What the optimizer owns under HFT (round 0, category, ratio 0.5, meta device)\n\nCommand: "
                    f"`{command.strip()}`\n\n{text}\n\n{summary}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
