"""What enable_hft costs per training step, against the same half frozen by hand.

Two HF Trainers on two copies of the same model, in one process, trained in alternation (order
swapped every round so drift in machine load hits both alike):

* ``enable_hft``: ``enable_hft(trainer)``, nothing else.
* ``by hand``: the same selection applied by hand: ``requires_grad=False`` on the frozen tensors
  and, for fused tensors trained in part, a gradient hook per tensor that zeroes the frozen slice.

A callback times every optimizer step (forward, backward, clipping, step); the first step of each
``train()`` call is dropped. Each round compares the fastest step of each variant (on a shared
machine the fastest is the least disturbed); the figure is the median of those ratios over rounds.
Weight decay is 0 so both variants keep frozen slices still by masking alone.

    python benchmarks/overhead.py [--rounds 15] [--steps 8] [--families llama phi3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hft_plugin import enable_hft, select_half
from hft_plugin.masking import region_mask
from hft_plugin.testing import tiny_model

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SIZES = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


class Batches(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int, vocab: int):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, vocab, (n, length), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def freeze_by_hand(model, selection) -> None:
    plan = selection.plan()
    params = dict(model.named_parameters())
    for name in plan.frozen:
        params[name].requires_grad_(False)
    for name, boxes in plan.partial.items():
        mask = region_mask(tuple(params[name].shape), boxes, device=params[name].device, dtype=params[name].dtype)
        params[name].register_hook(lambda grad, mask=mask: grad * mask)


def make_trainer(model, out: str, steps: int, batch: int, data) -> tuple[Trainer, StepTimer]:
    timer = StepTimer()
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                             weight_decay=0.0, max_grad_norm=1.0, save_strategy="no", report_to=[], use_cpu=True,
                             logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer])
    return trainer, timer


def measure(family: str, rounds: int, steps: int, batch: int, length: int) -> dict:
    data = Batches(steps * batch, length, 96)
    with tempfile.TemporaryDirectory() as tmp:
        hft_model, hand_model = tiny_model(family, **SIZES), tiny_model(family, **SIZES)
        hft, hft_timer = make_trainer(hft_model, f"{tmp}/hft", steps, batch, data)
        hand, hand_timer = make_trainer(hand_model, f"{tmp}/hand", steps, batch, data)
        handle = enable_hft(hft)
        freeze_by_hand(hand_model, select_half(hand_model))
        assert [n for n, p in hft_model.named_parameters() if p.requires_grad] == \
               [n for n, p in hand_model.named_parameters() if p.requires_grad]
        ratios, hft_medians, hand_medians = [], [], []
        for r in range(rounds):
            order = [(hft, hft_timer), (hand, hand_timer)]
            if r % 2:
                order.reverse()
            for trainer, timer in order:
                timer.times.clear()
                trainer.train()
            a, b = min(hft_timer.times[1:]), min(hand_timer.times[1:])
            hft_medians.append(a)
            hand_medians.append(b)
            ratios.append(a / b)
        return {
            "family": family, "params": sum(p.numel() for p in hft_model.parameters()),
            "masked_tensors": len(handle.masked_parameters), "rounds": rounds, "steps_per_round": steps,
            "batch": batch, "seq_len": length,
            "step_ms_enable_hft": 1000 * statistics.median(hft_medians),
            "step_ms_by_hand": 1000 * statistics.median(hand_medians),
            "median_ratio": statistics.median(ratios),
            "ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--families", nargs="+", default=["llama", "phi3"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    rows = [measure(f, args.rounds, args.steps, args.batch, args.seq_len) for f in args.families]

    header = "| model | params | masked tensors | step ms, enable_hft | step ms, by hand | median ratio | ratio IQR |"
    lines = [header, "|" + "---|" * 7]
    for r in rows:
        q = r["ratio_quartiles"]
        lines.append(f"| {r['family']} | {r['params']:,} | {r['masked_tensors']} | {r['step_ms_enable_hft']:.1f} | "
                     f"{r['step_ms_by_hand']:.1f} | {r['median_ratio']:.3f} | {q[0]:.3f}-{q[-1]:.3f} |")
    table = "\n".join(lines)
    print(table)
    command = "python benchmarks/overhead.py " + " ".join(sys.argv[1:])
    meta = {"command": command.strip(), "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": args.threads, "machine": platform.machine(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "overhead.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(RESULTS, "overhead.md"), "w") as f:
        f.write("# enable_hft overhead per training step\n\n"
                "Step time of an HF Trainer with `enable_hft(trainer)` against the same half frozen by hand "
                "(requires_grad flags, and a gradient hook per fused tensor), alternating in one process; "
                "ratio > 1 means enable_hft is slower. Each round compares the fastest step of each variant; the "
                "ratio is the median over rounds. Goal: median ratio <= 1.02.\n\n"
                f"`{meta['command']}` on {meta['cpus']} shared CPU cores ({meta['machine']}), torch {meta['torch']}, "
                f"transformers {meta['transformers']}, {args.threads} thread(s), {meta['date']}.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
