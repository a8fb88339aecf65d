"""HFT against full fine-tuning (FFT): step time, optimizer state and peak memory.

Both runs train the same model (same initial weights) on the same batches with AdamW. Their steps
alternate in one process (FFT, HFT, HFT, FFT, ...), so both see the same machine, load included;
the ratio HFT/FFT is taken from the medians, and also as the median of the per-pair ratios.
Optimizer-state bytes are counted from the optimizers' state tensors. Peak memory runs each
configuration in its own subprocess (peak RSS on CPU; on a GPU, max allocated, in process).

    python benchmarks/speed.py                                # tiny + SmolLM2-135M-sized, ratios 0.1 ... 0.9
    python benchmarks/speed.py --models tiny --steps 20
    python benchmarks/speed.py --models smollm2-135m --ratios 0.5 --steps 12

Results: benchmarks/results/speed.json (merged per model), speed.md and speed.png.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

# Llama configs with random weights (nothing downloads). smollm2-135m has SmolLM2-135M's shapes.
MODELS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0),
    # ~1.1B, TinyLlama's shapes: for benchmarks/speed_gpu.py
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
                     max_position_embeddings=4096),
    # Mixture-of-experts (Qwen3-MoE layout, stacked experts, ~0.7B parameters): for benchmarks/speed_gpu.py;
    # "model_type" picks the family (Llama when absent)
    "moe-0.7b": dict(model_type="qwen3_moe", hidden_size=1024, intermediate_size=3072, moe_intermediate_size=512,
                     num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                     num_experts=32, num_experts_per_tok=4, vocab_size=32000, tie_word_embeddings=False,
                     max_position_embeddings=4096),
    "tiny-moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                     num_experts_per_tok=2, vocab_size=96, tie_word_embeddings=False),
}
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
LR = 1e-5


def build_model(name: str, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32, **overrides):
    """A causal LM of config ``name`` (Llama unless it names a ``model_type``) with weights drawn from ``seed``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {**MODELS[name], **overrides}
    config = AutoConfig.for_model(values.pop("model_type", "llama"), **values)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.train()
    return model


class Run:
    """One model with its optimizer: full fine-tuning (ratio None) or HFT at ``ratio``."""

    def __init__(self, model, ratio: float | None, round: int = 0):
        from hft_plugin import apply_selection, select_half

        self.model = model
        self.ratio = ratio
        self.handle = None
        if ratio is None:
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            self.selection = select_half(model, round, ratio=ratio)
            self.handle = apply_selection(model, self.selection)
            params = self.handle.parameters()
        # weight_decay=0 as the transformers Trainer's default; AdamW's foreach path as it picks.
        self.optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
        if self.handle is not None:
            self.handle.attach(self.optimizer)
        self.params = params

    def step(self, batch: torch.Tensor) -> float:
        """One training step (forward, backward, clip, AdamW); its wall time in seconds."""
        sync = torch.cuda.synchronize if batch.is_cuda else (lambda: None)
        sync()
        start = time.perf_counter()
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        if self.handle is not None:
            self.handle.mask_gradients()  # as a trainer does before clipping (a no-op without fused tensors)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                   for t in s.values() if torch.is_tensor(t))

    def trainable_numel(self) -> int:
        return sum(p.numel() for p in self.params)


def batches(vocab: int, batch: int, seq: int, device: str, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(3, vocab, (batch, seq), generator=gen).to(device)


def measure_speed(model_name: str, ratios, steps: int, warmup: int, batch: int, seq: int,
                  device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0, log=print) -> list[dict]:
    """Alternate FFT and HFT steps at each ratio; one row per ratio.

    FFT is measured again next to every ratio, so every ratio compares steps taken under the
    same machine load.
    """
    fft = Run(build_model(model_name, seed, device, dtype), None)
    total = sum(p.numel() for p in fft.params)
    vocab = MODELS[model_name]["vocab_size"]
    rows = []
    for ratio in ratios:
        hft = Run(build_model(model_name, seed, device, dtype), ratio)
        data = batches(vocab, batch, seq, device, seed=1)
        times: dict[str, list[float]] = {"fft": [], "hft": []}
        for i in range(warmup + steps):
            ids = next(data)
            order = ((("fft", fft), ("hft", hft)) if i % 2 == 0 else (("hft", hft), ("fft", fft)))
            for mode, run in order:
                elapsed = run.step(ids)
                if i >= warmup:
                    times[mode].append(elapsed)
        fft_median, hft_median = statistics.median(times["fft"]), statistics.median(times["hft"])
        pairs = statistics.median(h / f for h, f in zip(times["hft"], times["fft"]))
        share = hft.trainable_numel() / total
        row = dict(
            model=model_name, ratio=ratio, layer_ratio=hft.selection.trainable_ratio,
            trainable_share=share, params=total, steps=steps,
            fft_step_s=fft_median, hft_step_s=hft_median, step_ratio=hft_median / fft_median, step_ratio_paired=pairs,
            fft_state_bytes=fft.state_bytes(), hft_state_bytes=hft.state_bytes(),
        )
        row["state_ratio"] = row["hft_state_bytes"] / row["fft_state_bytes"]
        row["state_vs_share"] = row["state_ratio"] / share - 1.0
        log(f"{model_name:>13} ratio {ratio:.1f}: FFT {fft_median * 1e3:8.1f} ms  HFT {hft_median * 1e3:8.1f} ms  "
            f"HFT/FFT {row['step_ratio']:.3f} (paired {pairs:.3f})  state {row['state_ratio']:.4f} vs share {share:.4f}")
        rows.append(row)
        del hft, data
        gc.collect()
    return rows


# -- peak memory: one configuration per process --------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's own RSS high-water mark (VmHWM).

    Not getrusage's ru_maxrss: that one survives exec, so a child started from a large parent
    reports the parent's RSS at fork time.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def peak_memory_child(model_name: str, ratio: float | None, steps: int, batch: int, seq: int) -> dict:
    """Run ``steps`` steps of one configuration in this process; report its peak RSS."""
    run = Run(build_model(model_name), ratio)
    gc.collect()
    before = _rss_bytes()
    data = batches(MODELS[model_name]["vocab_size"], batch, seq, "cpu")
    for _ in range(steps):
        run.step(next(data))
    peak = _peak_rss_bytes()
    return dict(peak_rss_bytes=peak, rss_before_training_bytes=before)


def measure_peak_memory(model_name: str, ratios, steps: int, batch: int, seq: int, log=print) -> dict:
    """Peak RSS of FFT and of HFT at each ratio, each in a fresh subprocess."""
    results = {}
    for ratio in (None, *ratios):
        command = [sys.executable, os.path.abspath(__file__), "--peak-memory-child", model_name,
                   "none" if ratio is None else str(ratio), str(steps), str(batch), str(seq)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results["fft" if ratio is None else f"{ratio:g}"] = json.loads(out.strip().splitlines()[-1])
        log(f"{model_name:>13} peak RSS {'FFT' if ratio is None else f'HFT {ratio:g}'}: "
            f"{results['fft' if ratio is None else f'{ratio:g}']['peak_rss_bytes'] / 2**20:,.0f} MiB")
    return results


def peak_memory_cuda(model_name: str, ratios, steps: int, batch: int, seq: int, dtype: torch.dtype) -> dict:
    """Max allocated GPU memory of FFT and of HFT at each ratio, one configuration alive at a time."""
    results = {}
    for ratio in (None, *ratios):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        run = Run(build_model(model_name, 0, "cuda", dtype), ratio)
        data = batches(MODELS[model_name]["vocab_size"], batch, seq, "cuda")
        for _ in range(steps):
            run.step(next(data))
        results["fft" if ratio is None else f"{ratio:g}"] = dict(peak_allocated_bytes=torch.cuda.max_memory_allocated())
        del run, data
    return results


def attach_memory(rows: list[dict], memory: dict, key: str) -> None:
    fft_peak = memory["fft"][key]
    for row in rows:
        peak = memory[f"{row['ratio']:g}"][key]
        row["fft_peak_bytes"], row["hft_peak_bytes"], row["peak_ratio"] = fft_peak, peak, peak / fft_peak
        for extra in ("rss_before_training_bytes",):
            if extra in memory["fft"]:
                row[f"fft_{extra}"] = memory["fft"][extra]
                row[f"hft_{extra}"] = memory[f"{row['ratio']:g}"][extra]


# -- writing -------------------------------------------------------------------------------------

def machine() -> dict:
    info = dict(python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
                cpu=_cpu_name(), cores=os.cpu_count(), threads=torch.get_num_threads())
    with contextlib.suppress(Exception):
        import transformers

        info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(OSError):
        info["load_avg_at_end"] = os.getloadavg()
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def table(rows: list[dict]) -> str:
    """A Markdown table of rows from measure_speed (with peak memory when measured)."""
    head = ("| model | HFT ratio | trainable share | FFT step | HFT step | HFT/FFT (medians) | HFT/FFT (paired) "
            "| opt. state HFT/FFT | peak mem HFT/FFT |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        peak = f"{r['peak_ratio']:.3f} ({r['hft_peak_bytes'] / 2**20:,.0f} / {r['fft_peak_bytes'] / 2**20:,.0f} MiB)" \
            if "peak_ratio" in r else "not measured"
        lines.append(
            f"| {r['model']} | {r['ratio']:g} | {r['trainable_share']:.4f} | {r['fft_step_s'] * 1e3:,.1f} ms "
            f"| {r['hft_step_s'] * 1e3:,.1f} ms | {r['step_ratio']:.3f} | {r['step_ratio_paired']:.3f} "
            f"| {r['state_ratio']:.4f} ({r['state_vs_share']:+.2%} vs share) | {peak} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = results["models"][name]["rows"]
        x = [r["ratio"] for r in rows]
        ax.plot(x, [r["step_ratio"] for r in rows], "o-", label="step time HFT/FFT")
        ax.plot(x, [r["state_ratio"] for r in rows], "s-", label="optimizer state HFT/FFT")
        if all("peak_ratio" in r for r in rows):
            ax.plot(x, [r["peak_ratio"] for r in rows], "^-", label="peak memory HFT/FFT")
        ax.plot(x, [r["trainable_share"] for r in rows], "k:", label="trainable share")
        ax.set_xlabel("HFT ratio (trainable share of the layers)")
        ax.set_ylim(0, 1.1)
        ax.grid(alpha=0.3)
        ax.set_title(f"{name} ({rows[0]['params'] / 1e6:,.1f}M params)")
    axes[0][0].set_ylabel("HFT / FFT")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(results: dict, name: str = "speed", notes: str = "") -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = [f"# HFT vs full fine-tuning: {name}", "", notes, ""] if notes else [f"# HFT vs full fine-tuning: {name}", ""]
    for model, entry in results["models"].items():
        m, s = entry["machine"], entry["settings"]
        lines += [
            f"## {model}", "",
            f"Command: `{entry['command']}`  ",
            *([f"Peak memory measured again with: `{entry['memory_command']}`  "] if "memory_command" in entry else []),
            f"Machine: {m.get('gpu') or m['cpu']}, {m['cores']} cores ({s.get('threads', m['threads'])} torch threads), "
            f"torch {m['torch']}, transformers {m.get('transformers', '?')}, Python {m['python']}; "
            f"load average at the end {', '.join(f'{v:.1f}' for v in m.get('load_avg_at_end', ()))}  ",
            f"Settings: batch {s['batch']} x {s['seq']} tokens, {s['dtype']}, AdamW (weight decay 0), "
            f"{s['warmup']} warm-up + {s['steps']} measured steps each way, alternating; measured {entry['date']}", "",
            table(entry["rows"]), "",
        ]
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write("\n".join(lines))
    plot(results, os.path.join(RESULTS, f"{name}.png"))


def load_results(name: str = "speed") -> dict:
    path = os.path.join(RESULTS, f"{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"models": {}}


NOTES = (
    "Step times are medians of steps that alternate FFT and HFT in one process, so both see the same "
    "machine. The machine's 2 cores were shared with other jobs while these ran: absolute times are "
    "noisy, the side-by-side ratios much less so. Optimizer state: bytes of AdamW's state tensors; "
    "trainable share: trainable parameters / all parameters (embeddings and lm_head train, as in "
    "the paper). Peak memory: peak RSS of a fresh process per configuration (imports and model "
    "included), after the same number of steps. No GPU was available for these runs; "
    "see benchmarks/speed_gpu.py."
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,smollm2-135m")
    parser.add_argument("--ratios", default=",".join(map(str, DEFAULT_RATIOS)))
    parser.add_argument("--steps", type=int, default=10, help="measured steps each way, per ratio")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="default: 8 (tiny), 2 (larger)")
    parser.add_argument("--seq", type=int, default=None, help="default: 64")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per peak-memory subprocess (0: skip)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine, 2 OpenMP threads wait on each other)")
    parser.add_argument("--memory-only", action="store_true",
                        help="measure peak memory again for the stored rows of each model, keep the step times")
    parser.add_argument("--tag", default="", help="store as MODEL-TAG, keeping earlier results of MODEL")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["HFT_BENCH_THREADS"] = str(args.threads)  # for the peak-memory subprocesses
    ratios = [float(r) for r in args.ratios.split(",")]
    results = load_results()
    for name in args.models.split(","):
        batch = args.batch or (8 if name == "tiny" else 2)
        seq = args.seq or 64
        key = f"{name}-{args.tag}" if args.tag else name
        command = "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
        if args.memory_only:
            entry = results["models"][key]
            s = entry["settings"]
            rows = entry["rows"]
            memory = measure_peak_memory(name, [r["ratio"] for r in rows], args.memory_steps, s["batch"], s["seq"])
            attach_memory(rows, memory, "peak_rss_bytes")
            s["memory_steps"] = args.memory_steps
            entry["memory_command"] = command
            print(table(rows))
            if not args.no_write:
                write_results(results, "speed", NOTES)
            continue
        rows = measure_speed(name, ratios, args.steps, args.warmup, batch, seq)
        if args.memory_steps:
            attach_memory(rows, measure_peak_memory(name, ratios, args.memory_steps, batch, seq), "peak_rss_bytes")
        print(table(rows))
        results["models"][key] = dict(
            rows=rows, machine=machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            command=command,
            settings=dict(batch=batch, seq=seq, steps=args.steps, warmup=args.warmup, dtype="float32",
                          memory_steps=args.memory_steps, threads=args.threads),
        )
        if not args.no_write:
            write_results(results, "speed", NOTES)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--peak-memory-child":
        torch.set_num_threads(int(os.environ.get("HFT_BENCH_THREADS", "1")))
        _, _, model_name, ratio, steps, batch, seq = sys.argv
        result = peak_memory_child(model_name, None if ratio == "none" else float(ratio), int(steps), int(batch), int(seq))
        print(json.dumps(result))
        sys.exit(0)
    sys.exit(main())
