"""Which should I pick? Full fine-tuning (FFT), HFT and LoRA side by side on one model.

The same model (a Llama with SmolLM2-135M's shapes and random weights, or the tiny test Llama)
is trained three ways on the same batches with AdamW (weight decay 0) and gradient clipping at
1.0, one step of each in turn in one process (the order rotating each step, so all three see the
same machine and load):

* ``fft``: every parameter trains;
* ``hft``: HFT, category strategy, ratio 0.5, round 0 (``select_half`` + ``apply_selection``);
* ``lora``: PEFT LoRA with the forgetting benchmark's setting (``forgetting.LORA``: rank 16,
  alpha 32, every linear layer of the transformer blocks; embeddings, lm_head and norms frozen).

Per method: the trainable share (trainable elements over the base model's elements; LoRA's
adapter elements over the same denominator), AdamW's state bytes, the median step time relative
to FFT's in CPU time of this process (one torch thread: what the step computed, not the time it
waited for a core; wall-time ratios beside it), the peak memory of a fresh process per method
(peak RSS after a few steps, and its rise above the RSS before training), and the disk a round
adds: what ``save_pretrained`` writes after training (FFT and HFT: the whole model; LoRA: its
adapter), in the model's dtype (fp32 here).

    python benchmarks/methods.py                          # SmolLM2-135M shapes, batch 4 x 256 tokens
    python benchmarks/methods.py --model tiny --steps 2   # seconds: the mechanics

Results: benchmarks/results/methods.{json,md} (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's hft_plugin
sys.path.insert(0, HERE)

import speed  # noqa: E402
import speed_families  # noqa: E402

METHODS = ("fft", "hft", "lora")
MODEL = {"smollm2-135m": "smollm2-135m", "tiny": "tiny"}


def lora_config():
    """The forgetting benchmark's LoRA setting (one definition: ``forgetting.LORA``)."""
    import forgetting

    return forgetting.lora_config()


def make_run(model_name: str, method: str) -> tuple[speed_families.Run, int]:
    """A model of ``model_name`` (the same weights for every method) set up for ``method``, with its
    AdamW; and the base model's element count."""
    model = speed.build_model(model_name, seed=0)
    total = sum(p.numel() for p in model.parameters())
    if method == "fft":
        return speed_families.Run(model), total
    if method == "hft":
        import hft_plugin

        return speed_families.Run(model, hft_plugin), total  # select_half(model, 0): category, ratio 0.5
    if method == "lora":
        from peft import get_peft_model

        return speed_families.Run(get_peft_model(model, lora_config())), total  # AdamW over the adapter only
    raise ValueError(f"unknown method {method!r}; pick from {', '.join(METHODS)}")


def saved_bytes(run: speed_families.Run) -> tuple[int, list[str]]:
    """Bytes that ``save_pretrained`` writes for the trained model (a PeftModel writes its adapter), and the files."""
    folder = tempfile.mkdtemp(prefix="hft-methods-save-")
    try:
        run.model.save_pretrained(folder)
        files = sorted(os.listdir(folder))
        return sum(os.path.getsize(os.path.join(folder, f)) for f in files), files
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure(model_name: str, steps: int, warmup: int, batch: int, seq: int, log=print) -> list[dict[str, Any]]:
    """One row per method: share, optimizer state, step times (alternating in this process), disk per round."""
    runs, totals = {}, {}
    for method in METHODS:
        runs[method], totals[method] = make_run(model_name, method)
    times, cpu = speed_families.alternate(runs, steps, warmup, speed.MODELS[model_name]["vocab_size"], batch, seq)
    rows = []
    for method, run in runs.items():
        trainable = sum(p.numel() for p in run.params)
        disk, files = saved_bytes(run)
        row = dict(method=method, params=totals[method], trainable=trainable, trainable_share=trainable / totals[method],
                   state_bytes=run.state_bytes(), grad_bytes=run.grad_bytes,
                   cpu_s=statistics.median(cpu[method]), wall_s=statistics.median(times[method]),
                   cpu_ratio=statistics.median(cpu[method]) / statistics.median(cpu["fft"]),
                   wall_ratio=statistics.median(times[method]) / statistics.median(times["fft"]),
                   wall_ratio_paired=statistics.median(t / f for t, f in zip(times[method], times["fft"])),
                   disk_bytes=disk, disk_files=files)
        rows.append(row)
        log(f"{model_name} {method:>4}: share {row['trainable_share']:.4f}  state {row['state_bytes'] / 2**20:,.1f} MiB  "
            f"step CPU {row['cpu_s']:.2f}s ({row['cpu_ratio']:.3f} of FFT)  disk {disk / 2**20:,.1f} MiB {files}")
    fft = rows[0]
    for row in rows:
        row["state_ratio"] = row["state_bytes"] / fft["state_bytes"]
        row["disk_ratio"] = row["disk_bytes"] / fft["disk_bytes"]
    del runs
    gc.collect()
    return rows


# -- peak memory: one method per fresh process ------------------------------------------------------

def peak_memory_child(model_name: str, method: str, steps: int, batch: int, seq: int) -> dict:
    run, _ = make_run(model_name, method)
    gc.collect()
    before = speed._rss_bytes()  # model and optimizer exist; AdamW's state appears at the first step
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        run.step(torch.randint(3, speed.MODELS[model_name]["vocab_size"], (batch, seq), generator=gen))
    return dict(peak_rss_bytes=speed._peak_rss_bytes(), rss_before_training_bytes=before)


def measure_peak_memory(model_name: str, steps: int, batch: int, seq: int, log=print) -> dict:
    results = {}
    for method in METHODS:
        command = [sys.executable, os.path.abspath(__file__), "--peak-memory-child", model_name, method, str(steps),
                   str(batch), str(seq)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])
        log(f"{model_name} {method:>4}: peak RSS {results[method]['peak_rss_bytes'] / 2**20:,.0f} MiB (+"
            f"{(results[method]['peak_rss_bytes'] - results[method]['rss_before_training_bytes']) / 2**20:,.0f} in training)")
    return results


def attach_memory(rows: list[dict], memory: dict) -> None:
    fft = memory["fft"]
    fft_rise = fft["peak_rss_bytes"] - fft["rss_before_training_bytes"]
    for row in rows:
        m = memory[row["method"]]
        row["peak_rss_bytes"], row["rss_before_training_bytes"] = m["peak_rss_bytes"], m["rss_before_training_bytes"]
        row["peak_ratio"] = m["peak_rss_bytes"] / fft["peak_rss_bytes"]
        row["training_memory_ratio"] = (m["peak_rss_bytes"] - m["rss_before_training_bytes"]) / fft_rise


# -- writing ------------------------------------------------------------------------------------------

NAMES = {"fft": "full fine-tuning", "hft": "HFT (category, ratio 0.5)", "lora": "LoRA (r 16, all linear layers)"}


def table(rows: list[dict]) -> str:
    head = ("| method | trainable share | optimizer state | step time / FFT: CPU | wall (medians) | wall (paired) "
            "| peak RSS | peak RSS / FFT | training memory / FFT | disk per round |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        peak = (f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB", f"{r['peak_ratio']:.3f}", f"{r['training_memory_ratio']:.3f}") \
            if "peak_ratio" in r else ("not measured",) * 3
        lines.append(
            f"| {NAMES[r['method']]} | {r['trainable_share']:.4f} | {r['state_bytes'] / 2**20:,.1f} MiB "
            f"({r['state_ratio']:.3f}) | {r['cpu_ratio']:.3f} | {r['wall_ratio']:.3f} | {r['wall_ratio_paired']:.3f} "
            f"| {peak[0]} | {peak[1]} | {peak[2]} | {r['disk_bytes'] / 2**20:,.1f} MiB ({r['disk_ratio']:.3f}) |")
    return "\n".join(lines)


def write(result: dict, path_base: str) -> None:
    with open(path_base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    m, s = result["machine"], result["settings"]
    fft = result["rows"][0]
    lines = [
        "# Full fine-tuning, HFT and LoRA side by side", "",
        f"Command: `{result['command']}`  ",
        f"Model: {s['model']} ({fft['params'] / 1e6:.1f}M parameters, random weights, fp32).  ",
        f"Machine: {m.get('gpu') or m['cpu']}, {m['cores']} cores ({m['threads']} torch thread(s)), torch {m['torch']}, "
        f"transformers {m.get('transformers', '?')}, peft {result['peft']}; load average at the start "
        f"{result['load_at_start']}, at the end {', '.join(f'{v:.1f}' for v in m.get('load_avg_at_end', ()))}  ",
        f"Settings: batch {s['batch']} x {s['seq']} tokens, AdamW (weight decay 0), clipping at 1.0, {s['warmup']} "
        f"warm-up + {s['steps']} measured steps per method, alternating in one process; peak memory after "
        f"{s['memory_steps']} steps in a fresh process per method; measured {result['date']}.  ",
        f"LoRA: {result['lora']}.", "",
        "Trainable share: trainable elements over the base model's (LoRA: adapter elements over the same). Optimizer "
        "state: AdamW's state tensors (in brackets: over FFT's). Step time: median per step over FFT's, CPU time of "
        "this process (one torch thread) and wall time. Peak RSS: a fresh process per method, imports and model "
        "included; training memory: its rise above the RSS before the first step. Disk per round: what "
        "`save_pretrained` writes after training (FFT and HFT: the whole model; LoRA: the adapter), fp32 (in "
        "brackets: over FFT's). A Trainer checkpoint that can resume also holds the optimizer state.", "",
        table(result["rows"]), "",
    ]
    with open(path_base + ".md", "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(MODEL))
    parser.add_argument("--steps", type=int, default=4, help="measured steps per method")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--memory-steps", type=int, default=2, help="steps per peak-memory process (0: skip)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(speed.RESULTS, "methods"), help="results path without suffix")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["HFT_BENCH_THREADS"] = str(args.threads)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    rows = measure(args.model, args.steps, args.warmup, args.batch, args.seq)
    if args.memory_steps:
        attach_memory(rows, measure_peak_memory(args.model, args.memory_steps, args.batch, args.seq))
    print(table(rows))
    if not args.no_write:
        import peft

        import forgetting

        write(dict(rows=rows, machine=speed.machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   command=" ".join(["python benchmarks/methods.py", *(argv if argv is not None else sys.argv[1:])]),
                   load_at_start=load, peft=peft.__version__, lora=forgetting.LORA,
                   settings=dict(model=args.model, batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
                                 memory_steps=args.memory_steps, threads=args.threads, dtype="float32")), args.out)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--peak-memory-child":
        torch.set_num_threads(int(os.environ.get("HFT_BENCH_THREADS", "1")))
        _, _, model_name, method, steps, batch, seq = sys.argv
        print(json.dumps(peak_memory_child(model_name, method, int(steps), int(batch), int(seq))))
        sys.exit(0)
    sys.exit(main())
