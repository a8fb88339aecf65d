"""HFT against full fine-tuning (FFT) across architectures: dense, fused and Mixture-of-Experts.

For each family (llama: separate projections; phi3: fused ``qkv_proj``/``gate_up_proj``; gpt2:
``Conv1D`` ``c_attn``; qwen3_moe and mixtral: stacked experts), the same model (same initial
weights) trains on the same batches with AdamW, one step each way in turn in one process:

* ``fft``: every parameter trains;
* ``hft``: HFT with this checkout's ``hft_plugin`` (category strategy, ratio 0.5, round 0);
* ``hft_before``: with ``--before DIR``, HFT with another copy of ``hft_plugin`` (the package in
  ``DIR/hft_plugin``, imported under another name), so an older version is measured side by side
  on the same machine, in the same process, on the same batches.

Per family and run: the trainable share (trainable elements / all elements), the optimizer-state
bytes (AdamW's state tensors) and gradient bytes (every ``.grad`` after backward) relative to
FFT, the median step time relative to FFT, both in CPU time of this process (``time.process_time``:
with one torch thread, the time the step computed, without the time it waited for a core on a
shared machine) and in wall time (ratio of medians, and median of per-step ratios), and the peak memory
of a fresh process per configuration (peak RSS, and its rise above the RSS before training, which
leaves out the ~0.4 GiB of imports both share). The loop is the README's: backward,
``clip_grad_norm_(model.parameters())``, step.

    python benchmarks/speed_families.py                               # all five families
    python benchmarks/speed_families.py --before /tmp/hft-main         # also HFT as of another checkout
    python benchmarks/speed_families.py --families qwen3_moe --steps 4 --memory-steps 0

Results: benchmarks/results/speed_families.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's hft_plugin
sys.path.insert(0, HERE)

import speed  # noqa: E402

FAMILIES = ("llama", "phi3", "gpt2", "qwen3_moe", "mixtral")
VOCAB = 4096
# Sized so a step is dominated by arithmetic, not Python: 4 layers of hidden 512 and 1,024 tokens a
# step. The MoE families keep the same attention; their experts hold more parameters than a dense
# MLP while computing less per token (top-2).
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, tie_word_embeddings=False),
    "phi3": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, tie_word_embeddings=False),
    "gpt2": dict(n_embd=512, n_layer=4, n_head=8, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0, tie_word_embeddings=False),
    "qwen3_moe": dict(hidden_size=512, intermediate_size=1536, moe_intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=16,
                      num_experts_per_tok=2, tie_word_embeddings=False),
    "mixtral": dict(hidden_size=512, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False),
}
# Larger shapes for one GPU (benchmarks/speed_gpu.py --families).
GPU_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, tie_word_embeddings=False),
    "qwen3_moe": dict(hidden_size=2048, intermediate_size=5632, moe_intermediate_size=768, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, head_dim=128, num_experts=64,
                      num_experts_per_tok=8, tie_word_embeddings=False),
    "mixtral": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                    num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False),
}
LR = 1e-5


def load_plugin(directory: str | None):
    """This checkout's ``hft_plugin``, or the one in ``directory`` imported as ``hft_plugin_before``."""
    if directory is None:
        import hft_plugin

        return hft_plugin
    name = "hft_plugin_before"
    if name in sys.modules:
        return sys.modules[name]
    package = os.path.join(directory, "hft_plugin")
    spec = importlib.util.spec_from_file_location(name, os.path.join(package, "__init__.py"),
                                                  submodule_search_locations=[package])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build(family: str, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32, gpu: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict((GPU_CONFIGS if gpu else CONFIGS)[family], vocab_size=VOCAB, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    config = AutoConfig.for_model(family, **values)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.train()
    return model


class Run:
    """One model and its AdamW: FFT (``plugin`` None) or HFT with ``plugin``."""

    def __init__(self, model, plugin=None):
        self.model = model
        self.handle = None
        if plugin is None:
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            self.selection = plugin.select_half(model, 0)
            self.handle = plugin.apply_selection(model, self.selection)
            params = self.handle.parameters()
        self.optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
        if self.handle is not None:
            self.handle.attach(self.optimizer)
        self.params = params
        self.grad_bytes = 0

    def step(self, batch: torch.Tensor) -> tuple[float, float]:
        """One step; its wall time and this process's CPU time, in seconds."""
        sync = torch.cuda.synchronize if batch.is_cuda else (lambda: None)
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        self.model(input_ids=batch, labels=batch).loss.backward()
        if self.handle is not None:
            self.handle.mask_gradients()  # as trainers do before clipping (a no-op without masked tensors)
        self.grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in self.model.parameters() if p.grad is not None)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start, time.process_time() - cpu_start

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                   for t in s.values() if torch.is_tensor(t) and t.dim() > 0)

    def mechanisms(self) -> str:
        mechanisms = getattr(self.handle, "mechanisms", None)
        if mechanisms is None:  # a version without mechanisms: every partly trained tensor is masked
            masked = getattr(self.handle, "masked_parameters", {})
            return f"mask x{len(masked)}" if masked else "none"
        counts: dict[str, int] = {}
        for mechanism in mechanisms().values():
            counts[mechanism] = counts.get(mechanism, 0) + 1
        return ", ".join(f"{m} x{n}" for m, n in sorted(counts.items())) or "none"


def alternate(runs: dict[str, "Run"], steps: int, warmup: int, vocab: int, batch: int, seq: int,
              device: str = "cpu") -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Step every run on the same random batches, rotating their order each step; the measured steps'
    wall and CPU times per run (the first ``warmup`` steps are left out)."""
    gen = torch.Generator().manual_seed(1)
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + steps):
        ids = torch.randint(3, vocab, (batch, seq), generator=gen).to(device)
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            elapsed, cpu_elapsed = runs[name].step(ids)
            if i >= warmup:
                times[name].append(elapsed)
                cpu[name].append(cpu_elapsed)
    return times, cpu


def measure(family: str, steps: int, warmup: int, batch: int, seq: int, before: str | None = None,
            device: str = "cpu", dtype: torch.dtype = torch.float32, gpu: bool = False, log=print) -> dict:
    """One row: FFT, HFT (and HFT with the ``before`` copy) alternating, rotating the order each step."""
    runs = {"fft": Run(build(family, device=device, dtype=dtype, gpu=gpu))}
    runs["hft"] = Run(build(family, device=device, dtype=dtype, gpu=gpu), load_plugin(None))
    if before:
        runs["hft_before"] = Run(build(family, device=device, dtype=dtype, gpu=gpu), load_plugin(before))
    total = sum(p.numel() for p in runs["fft"].model.parameters())
    names = list(runs)
    times, cpu = alternate(runs, steps, warmup, VOCAB, batch, seq, device)
    fft = runs["fft"]
    row: dict[str, Any] = dict(family=family, params=total, steps=steps, fft_step_s=statistics.median(times["fft"]),
                               fft_cpu_s=statistics.median(cpu["fft"]),
                               fft_state_bytes=fft.state_bytes(), fft_grad_bytes=fft.grad_bytes)
    for name in names[1:]:
        run = runs[name]
        trainable = sum(p.numel() for p in run.params)  # what the optimizer owns (a masked tensor whole)
        share = run.selection.stats()["trainable_params"] / total
        prefix = name
        row.update({
            f"{prefix}_share": share,
            f"{prefix}_optimizer_owns": trainable / total,
            f"{prefix}_mechanisms": run.mechanisms(),
            f"{prefix}_step_s": statistics.median(times[name]),
            f"{prefix}_step_ratio": statistics.median(times[name]) / row["fft_step_s"],
            f"{prefix}_step_ratio_paired": statistics.median(h / f for h, f in zip(times[name], times["fft"])),
            f"{prefix}_cpu_s": statistics.median(cpu[name]),
            f"{prefix}_cpu_ratio": statistics.median(cpu[name]) / row["fft_cpu_s"],
            f"{prefix}_state_ratio": run.state_bytes() / row["fft_state_bytes"],
            f"{prefix}_grad_ratio": run.grad_bytes / row["fft_grad_bytes"],
        })
        log(f"{family:>10} {name:>10}: share {share:.3f}  state {row[f'{prefix}_state_ratio']:.3f}  grads "
            f"{row[f'{prefix}_grad_ratio']:.3f}  step {row[f'{prefix}_step_ratio']:.3f} "
            f"(paired {row[f'{prefix}_step_ratio_paired']:.3f}, CPU time {row[f'{prefix}_cpu_ratio']:.3f})  "
            f"[{row[f'{prefix}_mechanisms']}]")
    del runs
    gc.collect()
    return row


# -- peak memory: one configuration per process --------------------------------------------------

def peak_memory_child(family: str, mode: str, steps: int, batch: int, seq: int, before: str | None) -> dict:
    plugin = None if mode == "fft" else load_plugin(before if mode == "hft_before" else None)
    run = Run(build(family), plugin)
    gc.collect()
    rss_before = speed._rss_bytes()  # model and optimizer exist; AdamW's state appears at the first step
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        run.step(torch.randint(3, VOCAB, (batch, seq), generator=gen))
    return dict(peak_rss_bytes=speed._peak_rss_bytes(), rss_before_training_bytes=rss_before)


def measure_peak_memory(family: str, modes, steps: int, batch: int, seq: int, before: str | None, log=print) -> dict:
    results = {}
    for mode in modes:
        command = [sys.executable, os.path.abspath(__file__), "--peak-memory-child", family, mode, str(steps),
                   str(batch), str(seq), before or ""]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
        log(f"{family:>10} {mode:>10}: peak RSS {results[mode]['peak_rss_bytes'] / 2**20:,.0f} MiB "
            f"(+{(results[mode]['peak_rss_bytes'] - results[mode]['rss_before_training_bytes']) / 2**20:,.0f} in training)")
    return results


def peak_memory_cuda(family: str, modes, steps: int, batch: int, seq: int, dtype: torch.dtype,
                     before: str | None = None) -> dict:
    """Max allocated GPU memory per configuration, one alive at a time (``rss_before_training_bytes``:
    what was allocated once model and optimizer existed)."""
    results = {}
    for mode in modes:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        plugin = None if mode == "fft" else load_plugin(before if mode == "hft_before" else None)
        run = Run(build(family, device="cuda", dtype=dtype, gpu=True), plugin)
        allocated = torch.cuda.memory_allocated()
        gen = torch.Generator().manual_seed(1)
        for _ in range(steps):
            run.step(torch.randint(3, VOCAB, (batch, seq), generator=gen).cuda())
        results[mode] = dict(peak_rss_bytes=torch.cuda.max_memory_allocated(), rss_before_training_bytes=allocated)
        del run
    return results


def attach_memory(row: dict, memory: dict) -> None:
    fft = memory["fft"]
    fft_rise = fft["peak_rss_bytes"] - fft["rss_before_training_bytes"]
    for mode, values in memory.items():
        row[f"{mode}_peak_rss_bytes"] = values["peak_rss_bytes"]
        row[f"{mode}_rss_before_training_bytes"] = values["rss_before_training_bytes"]
        if mode != "fft":
            row[f"{mode}_peak_ratio"] = values["peak_rss_bytes"] / fft["peak_rss_bytes"]
            rise = values["peak_rss_bytes"] - values["rss_before_training_bytes"]
            row[f"{mode}_training_memory_ratio"] = rise / fft_rise if fft_rise > 0 else float("nan")


# -- writing -------------------------------------------------------------------------------------

def table(rows: list[dict], mode: str = "hft") -> str:
    head = ("| family | params | mechanisms | trainable share | optimizer owns | opt. state HFT/FFT | grad bytes HFT/FFT "
            "| step HFT/FFT: CPU time | wall (medians) | wall (paired) | peak RSS HFT/FFT | training memory HFT/FFT |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if f"{mode}_share" not in r:
            continue
        peak = f"{r[f'{mode}_peak_ratio']:.3f}" if f"{mode}_peak_ratio" in r else "not measured"
        rise = f"{r[f'{mode}_training_memory_ratio']:.3f}" if f"{mode}_training_memory_ratio" in r else "not measured"
        lines.append(
            f"| {r['family']} | {r['params'] / 1e6:.1f}M | {r[f'{mode}_mechanisms']} | {r[f'{mode}_share']:.3f} "
            f"| {r[f'{mode}_optimizer_owns']:.3f} | {r[f'{mode}_state_ratio']:.3f} | {r[f'{mode}_grad_ratio']:.3f} "
            f"| {_cpu(r, mode)} | {r[f'{mode}_step_ratio']:.3f} | {r[f'{mode}_step_ratio_paired']:.3f} | {peak} | {rise} |")
    return "\n".join(lines)


def _cpu(row: dict, mode: str) -> str:
    return f"{row[f'{mode}_cpu_ratio']:.3f}" if f"{mode}_cpu_ratio" in row else "-"


def goals(rows: list[dict], mode: str = "hft", key: str = "cpu_ratio") -> list[str]:
    """The goals, checked on ``rows``: optimizer state within 0.01 of the trainable share; fused and
    MoE step ratios (``key``: the CPU-time ratio of medians by default, which a loaded machine
    disturbs least) no worse than Llama's + 0.03. Gradient bytes are reported beside them: a tensor
    trained in part has its whole gradient (zero where frozen), so they exceed the share there."""
    out = []
    llama = next((r for r in rows if r["family"] == "llama" and f"{mode}_{key}" in r), None)
    for r in rows:
        if f"{mode}_share" not in r:
            continue
        share = r[f"{mode}_share"]
        state_ok = abs(r[f"{mode}_state_ratio"] - share) <= 0.01
        text = (f"{r['family']}: state {r[f'{mode}_state_ratio'] - share:+.3f} vs share ({'met' if state_ok else 'missed'}), "
                f"gradients {r[f'{mode}_grad_ratio'] - share:+.3f} vs share")
        if llama is not None and r["family"] != "llama":
            limit = llama[f"{mode}_{key}"] + 0.03
            step = r[f"{mode}_{key}"]
            text += f", step {step:.3f} vs Llama's {llama[f'{mode}_{key}']:.3f} + 0.03 " \
                    f"({'met' if step <= limit else f'missed by {step - limit:.3f}'})"
        out.append(text)
    return out


def write(result: dict, path_base: str) -> None:
    with open(path_base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    m, s = result["machine"], result["settings"]
    lines = [
        "# HFT vs full fine-tuning across architectures", "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m.get('gpu') or m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), torch {m['torch']}, "
        f"transformers {m.get('transformers', '?')}; load average at the start {result['load_at_start']}, at the end "
        f"{', '.join(f'{v:.1f}' for v in m.get('load_avg_at_end', ()))}  ",
        f"Settings: batch {s['batch']} x {s['seq']} tokens, {s['dtype']}, AdamW (weight decay 0), clipping at 1.0, "
        f"{s['warmup']} warm-up + {s['steps']} measured steps per run, runs alternating in one process; peak memory "
        f"after {s['memory_steps']} steps in a fresh process per configuration; measured {result['date']}", "",
    ]
    if result.get("before"):
        lines += [f"## Before: HFT as of {result['before']}", "", table(result["rows"], "hft_before"), "",
                  *[f"- {g}" for g in goals(result["rows"], "hft_before")], ""]
    lines += [f"## {'After: this checkout' if result.get('before') else 'HFT'}", "", table(result["rows"], "hft"), "",
              *[f"- {g}" for g in goals(result["rows"], "hft")], ""]
    with open(path_base + ".md", "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--steps", type=int, default=8, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--memory-steps", type=int, default=2, help="steps per peak-memory subprocess (0: skip)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--before", default=None, help="a directory holding another hft_plugin to measure beside this one")
    parser.add_argument("--before-label", default=None, help="how to name it in the results (e.g. a commit)")
    parser.add_argument("--out", default=os.path.join(speed.RESULTS, "speed_families"), help="results path without suffix")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["HFT_BENCH_THREADS"] = str(args.threads)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    rows = []
    for family in args.families.split(","):
        row = measure(family, args.steps, args.warmup, args.batch, args.seq, args.before)
        if args.memory_steps:
            modes = ["fft", "hft"] + (["hft_before"] if args.before else [])
            attach_memory(row, measure_peak_memory(family, modes, args.memory_steps, args.batch, args.seq, args.before))
        rows.append(row)
    if args.before:
        print(f"Before ({args.before_label or args.before}):\n" + table(rows, "hft_before"))
        print("\n".join(goals(rows, "hft_before")))
    print("After:\n" + table(rows, "hft"))
    print("\n".join(goals(rows, "hft")))
    if not args.no_write:
        write(dict(rows=rows, machine=speed.machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   command="python benchmarks/speed_families.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   before=args.before_label or args.before, load_at_start=load,
                   settings=dict(batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup, dtype="float32",
                                 memory_steps=args.memory_steps, threads=args.threads)), args.out)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--peak-memory-child":
        torch.set_num_threads(int(os.environ.get("HFT_BENCH_THREADS", "1")))
        _, _, family, mode, steps, batch, seq, before = sys.argv
        print(json.dumps(peak_memory_child(family, mode, int(steps), int(batch), int(seq), before or None)))
        sys.exit(0)
    sys.exit(main())
