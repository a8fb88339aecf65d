"""HFT against full fine-tuning on one GPU: a ~1.1B Llama config (TinyLlama's shapes) in bf16.

The same measurements as speed.py: FFT and HFT steps alternate in one process (after warm-up),
median step time and the ratio HFT/FFT, optimizer-state bytes, and peak memory (max allocated,
one configuration alive at a time). Sized to fit one H100 in a few minutes:

    python benchmarks/speed_gpu.py                       # llama-1b, ratios 0.25,0.5,0.75, 10 steps each way
    python benchmarks/speed_gpu.py --cpu-check           # the same code path on CPU with the tiny config
    python benchmarks/speed_gpu.py --families llama,qwen3_moe,mixtral   # dense vs MoE (speed_families.py's
                                                         # GPU shapes: 8 layers, hidden 2048, 64 / 8 experts)

Results: benchmarks/results/speed_gpu.{json,md,png}, with the card's name.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import speed  # noqa: E402
import speed_families  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def run(model: str, ratios, steps: int, warmup: int, batch: int, seq: int, device: str, dtype: str,
        memory_steps: int, log=print) -> list[dict]:
    """Rows as speed.measure_speed's, with GPU peak memory attached when on CUDA."""
    torch_dtype = DTYPES[dtype]
    rows = speed.measure_speed(model, ratios, steps, warmup, batch, seq, device=device, dtype=torch_dtype, log=log)
    if device == "cuda" and memory_steps:
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        memory = speed.peak_memory_cuda(model, ratios, memory_steps, batch, seq, torch_dtype)
        speed.attach_memory(rows, memory, "peak_allocated_bytes")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-1b", choices=sorted(speed.MODELS))
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    parser.add_argument("--steps", type=int, default=10, help="measured steps each way, per ratio")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per peak-memory measurement (0: skip)")
    parser.add_argument("--families", default=None,
                        help="instead of the Llama ratio sweep: HFT vs FFT per family (e.g. llama,qwen3_moe,mixtral)")
    parser.add_argument("--cpu-check", action="store_true",
                        help="run the same code on CPU with the tiny config, few steps, and write nothing")
    args = parser.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    if args.families:
        return run_families(args)
    if args.cpu_check:
        rows = run("tiny", ratios, 2, 1, 2, 32, "cpu", args.dtype, 0)
        print(speed.table(rows))
        return 0
    if not torch.cuda.is_available():
        print("speed_gpu.py: no CUDA device here; nothing measured (use --cpu-check to test the script on CPU).",
              file=sys.stderr)
        return 1
    rows = run(args.model, ratios, args.steps, args.warmup, args.batch, args.seq, "cuda", args.dtype, args.memory_steps)
    print(speed.table(rows))
    results = {"models": {args.model: dict(
        rows=rows, machine=speed.machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command="python benchmarks/speed_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        settings=dict(batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup, dtype=args.dtype,
                      memory_steps=args.memory_steps, threads=torch.get_num_threads()),
    )}}
    speed.write_results(results, "speed_gpu", notes=(
        f"Measured on {torch.cuda.get_device_name(0)}. Steps alternate FFT and HFT in one process after "
        "warm-up; peak memory is torch.cuda.max_memory_allocated with one configuration alive at a time."))
    return 0


def run_families(args) -> int:
    """speed_families.py's measurement on one GPU (or, with --cpu-check, its CPU shapes, briefly)."""
    families = args.families.split(",")
    if args.cpu_check:
        rows = [speed_families.measure(f, 1, 0, 1, 16) for f in families]
        print(speed_families.table(rows))
        return 0
    if not torch.cuda.is_available():
        print("speed_gpu.py: no CUDA device here; nothing measured.", file=sys.stderr)
        return 1
    dtype = DTYPES[args.dtype]
    rows = []
    for family in families:
        row = speed_families.measure(family, args.steps, args.warmup, args.batch, args.seq, device="cuda",
                                     dtype=dtype, gpu=True)
        if args.memory_steps:
            speed_families.attach_memory(row, speed_families.peak_memory_cuda(
                family, ["fft", "hft"], args.memory_steps, args.batch, args.seq, dtype))
        rows.append(row)
    print(speed_families.table(rows))
    print("\n".join(speed_families.goals(rows)))
    speed_families.write(dict(
        rows=rows, machine=speed.machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command="python benchmarks/speed_gpu.py " + " ".join(sys.argv[1:]), before=None,
        load_at_start=", ".join(f"{v:.1f}" for v in os.getloadavg()),
        settings=dict(batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup, dtype=args.dtype,
                      memory_steps=args.memory_steps, threads=torch.get_num_threads())),
        os.path.join(speed.RESULTS, "speed_gpu_families"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
