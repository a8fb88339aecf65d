"""What enable_hft costs per training step, against the same half frozen by hand.

Two HF Trainers on two copies of the same model, in one process:

* ``enable_hft``: ``enable_hft(trainer)``, nothing else.
* ``by hand``: the same selection applied by hand: ``requires_grad=False`` on the frozen tensors
  and, for fused tensors trained in part, a gradient hook per tensor that zeroes the frozen slice.

Two measurements, both alternating the variants so that drift in machine load hits both alike:

* **paired steps** (the headline): after one ``train()`` call has set each trainer up (optimizer,
  masks, wrappers), optimizer steps are driven through the trainer's own methods
  (``training_step``, ``_clip_grad_norm``, ``optimizer.step``, ``zero_grad``): one step of each
  variant in turn, order swapped every pair. The figure is the median of the per-pair ratios.
  Everything HFT adds per step runs here (gradient mask before clipping, optimizer hooks); what it
  leaves out (the loop's bookkeeping) is the same code for both.
* **train() rounds**: whole ``train()`` calls in turn, the fastest step of each compared per round
  (first step dropped); noisier, since every call also sets up the run again.

Weight decay is 0 so both variants keep frozen slices still by masking alone.

With ``--before DIR`` the same measurement also runs against another checkout's ``hft_plugin`` (the
package in ``DIR``), to compare two versions on one machine in one invocation: each family's pairs
are split into blocks, and the blocks run in fresh interpreters, this checkout's and ``DIR``'s in
turn (order swapped every block), each against its own by-hand twin; the table then gives both
versions' ratios and the ratio of their medians.

    python benchmarks/overhead.py [--pairs 200] [--rounds 10] [--families llama phi3]
    python benchmarks/overhead.py --before /tmp/hft-old --blocks 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hft_plugin import enable_hft, select_half
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


def mask_by_hand(shape, boxes, dtype) -> torch.Tensor:
    """1 inside the union of ``boxes`` (each a tuple of ``(dim, start, stop)`` constraints), built here
    rather than by the plugin, so the reference depends on no version of it."""
    mask = torch.zeros(tuple(shape), dtype=dtype)
    for box in boxes:
        index = [slice(None)] * len(shape)
        for dim, start, stop in box:
            index[dim] = slice(start, stop)
        mask[tuple(index)] = 1
    return mask


def freeze_by_hand(model, selection) -> None:
    plan = selection.plan()
    params = dict(model.named_parameters())
    for name in plan.frozen:
        params[name].requires_grad_(False)
    for name, boxes in plan.partial.items():
        mask = mask_by_hand(params[name].shape, boxes, params[name].dtype).to(params[name].device)
        params[name].register_hook(lambda grad, mask=mask: grad * mask)


def make_trainer(model, out: str, steps: int, batch: int, data) -> tuple[Trainer, StepTimer]:
    timer = StepTimer()
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                             weight_decay=0.0, max_grad_norm=1.0, save_strategy="no", report_to=[], use_cpu=True,
                             logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer])
    return trainer, timer


def timed_step(trainer, batch) -> float:
    model = trainer.model_wrapped
    start = time.perf_counter()
    trainer.training_step(model, batch)
    trainer._clip_grad_norm(model)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def summarise(ratios: list[float], a: list[float], b: list[float]) -> dict:
    return {"step_ms_enable_hft": 1000 * statistics.median(a), "step_ms_by_hand": 1000 * statistics.median(b),
            "median_ratio": statistics.median(ratios), "ratio_quartiles": statistics.quantiles(ratios, n=4),
            "samples": {"ratios": ratios, "enable_hft_s": a, "by_hand_s": b}}


def measure(family: str, pairs: int, rounds: int, steps: int, batch: int, length: int) -> dict:
    data = Batches(steps * batch, length, 96)
    with tempfile.TemporaryDirectory() as tmp:
        hft_model, hand_model = tiny_model(family, **SIZES), tiny_model(family, **SIZES)
        hft, hft_timer = make_trainer(hft_model, f"{tmp}/hft", steps, batch, data)
        hand, hand_timer = make_trainer(hand_model, f"{tmp}/hand", steps, batch, data)
        handle = enable_hft(hft)
        freeze_by_hand(hand_model, select_half(hand_model))
        assert [n for n, p in hft_model.named_parameters() if p.requires_grad] == \
               [n for n, p in hand_model.named_parameters() if p.requires_grad]

        # train() rounds (these calls also set both trainers up for the paired steps)
        ratios, a, b = [], [], []
        for r in range(rounds):
            order = [(hft, hft_timer), (hand, hand_timer)]
            if r % 2:
                order.reverse()
            for trainer, timer in order:
                timer.times.clear()
                trainer.train()
            a.append(min(hft_timer.times[1:]))
            b.append(min(hand_timer.times[1:]))
            ratios.append(a[-1] / b[-1])
        rounds_result = summarise(ratios, a, b)

        # paired steps
        hft.model_wrapped.train()
        hand.model_wrapped.train()
        batches = [hft._prepare_inputs(data[i % len(data)] | {}) for i in range(batch)]
        example = {k: torch.stack([x[k] for x in batches]) for k in batches[0]}
        ratios, a, b = [], [], []
        for i in range(pairs + 2):
            first, second = (hft, hand) if i % 2 == 0 else (hand, hft)
            t_first, t_second = timed_step(first, example), timed_step(second, example)
            if i < 2:
                continue  # warm-up
            t_hft, t_hand = (t_first, t_second) if first is hft else (t_second, t_first)
            a.append(t_hft)
            b.append(t_hand)
            ratios.append(t_hft / t_hand)
        return {"family": family, "params": sum(p.numel() for p in hft_model.parameters()),
                "masked_tensors": len(handle.masked_parameters), "batch": batch, "seq_len": length,
                "paired_steps": {"pairs": pairs, **summarise(ratios, a, b)},
                "train_rounds": {"rounds": rounds, "steps_per_round": steps, **rounds_result}}


def child_block(directory: str, family: str, args) -> dict:
    """One block of paired steps in a fresh interpreter whose ``hft_plugin`` is the one in ``directory``."""
    command = [sys.executable, os.path.abspath(__file__), "--child", "--families", family, "--pairs",
               str(args.pairs // args.blocks), "--rounds", "2", "--steps", str(args.steps), "--batch",
               str(args.batch), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([directory, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env, cwd=directory).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare_versions(args) -> list[dict]:
    """Per family: this checkout's and ``--before``'s paired-step samples, gathered block by block in turn."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for family in args.families:
        samples = {"after": {"ratios": [], "enable_hft_s": [], "by_hand_s": []},
                   "before": {"ratios": [], "enable_hft_s": [], "by_hand_s": []}}
        for block in range(args.blocks):
            order = [("after", here), ("before", args.before)]
            if block % 2:
                order.reverse()
            for label, directory in order:
                child = child_block(directory, family, args)
                if child["plugin"] != os.path.join(os.path.abspath(directory), "hft_plugin"):
                    raise SystemExit(f"the {label} block imported {child['plugin']}, not {directory}'s hft_plugin")
                result = child["paired_steps"]["samples"]
                for key, values in result.items():
                    samples[label][key].extend(values)
                print(f"{family}: block {block + 1}/{args.blocks} {label}: median ratio "
                      f"{statistics.median(result['ratios']):.3f}", flush=True)
        row = {"family": family}
        for label, got in samples.items():
            row[label] = summarise(got["ratios"], got["enable_hft_s"], got["by_hand_s"])
        row["after_over_before"] = row["after"]["median_ratio"] / row["before"]["median_ratio"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5, help="steps per train() round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--families", nargs="+", default=["llama", "phi3"])
    parser.add_argument("--before", default=None, help="a checkout whose hft_plugin is measured beside this one")
    parser.add_argument("--before-label", default=None, help="how to name it in the results (e.g. a commit)")
    parser.add_argument("--blocks", type=int, default=4, help="with --before: blocks of pairs per version")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    if args.child:
        import hft_plugin

        row = measure(args.families[0], args.pairs, args.rounds, args.steps, args.batch, args.seq_len)
        print(json.dumps(dict(row, plugin=os.path.dirname(os.path.abspath(hft_plugin.__file__)))))
        return
    command = "python benchmarks/overhead.py " + " ".join(sys.argv[1:])
    meta = {"command": command.strip(), "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": args.threads, "machine": platform.machine(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.before:
        write_comparison(compare_versions(args), meta, args)
        return
    rows = [measure(f, args.pairs, args.rounds, args.steps, args.batch, args.seq_len) for f in args.families]
    for r in rows:
        for key in ("paired_steps", "train_rounds"):
            r[key].pop("samples")
    header = ("| model | params | masked tensors | method | step ms, enable_hft | step ms, by hand | median ratio "
              "| ratio IQR |")
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        for method, key in (("paired steps", "paired_steps"), ("train() rounds", "train_rounds")):
            m = r[key]
            q = m["ratio_quartiles"]
            lines.append(f"| {r['family']} | {r['params']:,} | {r['masked_tensors']} | {method} | "
                         f"{m['step_ms_enable_hft']:.1f} | {m['step_ms_by_hand']:.1f} | {m['median_ratio']:.3f} | "
                         f"{q[0]:.3f}-{q[-1]:.3f} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "overhead.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(RESULTS, "overhead.md"), "w") as f:
        f.write("# enable_hft overhead per training step\n\n"
                "Step time of an HF Trainer with `enable_hft(trainer)` against the same half frozen by hand "
                "(requires_grad flags, and a gradient hook per fused tensor), alternating in one process; "
                "ratio > 1 means enable_hft is slower. Paired steps: one optimizer step of each variant in turn "
                "through the trainer's own methods, median of the per-pair ratios (the headline). train() rounds: "
                "whole train() calls in turn, fastest step of each per round. Step ms: medians. "
                "Goal: median ratio <= 1.02.\n\n"
                f"`{meta['command']}` on {meta['cpus']} shared CPU cores ({meta['machine']}), torch {meta['torch']}, "
                f"transformers {meta['transformers']}, {args.threads} thread(s), {meta['date']}.\n\n" + table + "\n")


def write_comparison(rows: list[dict], meta: dict, args) -> None:
    label = args.before_label or os.path.basename(os.path.abspath(args.before))
    lines = ["| model | version | step ms, enable_hft | step ms, by hand | median ratio | ratio IQR | pairs |",
             "|" + "---|" * 7]
    for r in rows:
        for key, name in (("after", "this checkout"), ("before", label)):
            m = r[key]
            q = m["ratio_quartiles"]
            lines.append(f"| {r['family']} | {name} | {m['step_ms_enable_hft']:.1f} | {m['step_ms_by_hand']:.1f} | "
                         f"{m['median_ratio']:.3f} | {q[0]:.3f}-{q[-1]:.3f} | {len(m['samples']['ratios'])} |")
        lines.append(f"| {r['family']} | this / {label} | | | {r['after_over_before']:.3f} | | |")
    table = "\n".join(lines)
    print(table)
    for r in rows:
        for key in ("after", "before"):
            r[key].pop("samples")
    meta["before"] = label
    with open(os.path.join(RESULTS, "overhead_versions.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(RESULTS, "overhead_versions.md"), "w") as f:
        f.write("# enable_hft overhead per training step: two versions\n\n"
                f"Paired steps (see overhead.md) of this checkout and of {label}, each against its own by-hand "
                f"twin, in blocks of {args.pairs // args.blocks} pairs run in fresh interpreters in turn; "
                "`this / before` is the ratio of the two median ratios (> 1: this checkout adds more).\n\n"
                f"`{meta['command']}` on {meta['cpus']} shared CPU cores ({meta['machine']}), torch {meta['torch']}, "
                f"transformers {meta['transformers']}, {args.threads} thread(s), {meta['date']}.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
