"""What the forgetting monitor costs: time per measurement, step-time overhead at the default
``every``, and the memory of the kept base, with and without HFT.

A Llama with SmolLM2-135M's shapes (hidden 576, intermediate 1536, 30 layers, 9 heads, 3 key-value
heads, vocabulary 49152, tied embeddings) and random weights, in fp32. Each measurement is the
monitor's own (:func:`hft_plugin.forgetting.measure` with a :class:`BaseSnapshot`, as the Trainer
callback runs it) at the default probes (16 samples of up to 64 tokens, batch 8); a training step is
a plain loop's forward, backward and AdamW step on a random batch. Step-time overhead at ``every``
is measured time per measurement / (``every`` x step time): between measurements the callback
does one modulo. The KL on the current training batch (RL's Razor quantity) is timed the same way
on the step's batch, to decide whether it could be on by default.

    python benchmarks/forgetting_monitor_cost.py                 # CPU, 1 thread, 3 steps, 2 measurements each way
    python benchmarks/forgetting_monitor_cost.py --device cuda --steps 10 --repeats 5

Results: benchmarks/results/forgetting_monitor_cost.json and .md (``--name`` to change).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, bos_token_id=1, eos_token_id=2)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=96, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def build(shape: dict, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**shape)).to(device)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def make_step(model, params, batch):
    """One forward, backward and AdamW step on ``batch``."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step():
        model.train()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2-135m", "tiny"), default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--base-device", default="cpu", help="where the base's values are kept (the default: cpu)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per mode (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="timed measurements per mode")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--name", default="forgetting_monitor_cost")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from hft_plugin import apply_selection, select_half
    from hft_plugin.forgetting import (DEFAULT_BATCH_SIZE, DEFAULT_EVERY, DEFAULT_LENGTH, DEFAULT_SAMPLES,
                                       BaseSnapshot, Probes, measure, sample_probes)

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SMOLLM2_135M if args.model == "smollm2-135m" else TINY
    vocab = shape["vocab_size"]
    # two models from the same weights, one full fine-tuned and one under HFT; everything timed
    # alternates between them, so both share the machine's load
    models = {"full fine-tuning": build(shape, args.device), "HFT (ratio 0.5, category)": build(shape, args.device)}
    full_bytes = sum(p.numel() * p.element_size() for p in models["full fine-tuning"].parameters())
    total = sum(p.numel() for p in models["full fine-tuning"].parameters())
    hft = models["HFT (ratio 0.5, category)"]
    handle = apply_selection(hft, select_half(hft, round=0))
    params = {"full fine-tuning": list(models["full fine-tuning"].parameters()),
              "HFT (ratio 0.5, category)": handle.parameters()}
    generator = torch.Generator().manual_seed(1)
    batch = torch.randint(3, vocab, (args.batch, args.seq), generator=generator).to(args.device)
    batch_probes = Probes(batch.tolist(), [None] * args.batch, "texts", vocab)

    with torch.no_grad():  # the first forward pays one-time set-up costs that no measurement pays
        hft(input_ids=batch[:1, :8])
    box = {}
    sampling = timed(lambda: box.setdefault("probes", sample_probes(hft, count=DEFAULT_SAMPLES, length=DEFAULT_LENGTH)),
                     args.device)
    probes = box["probes"]
    bases = {mode: BaseSnapshot.capture(model, device=args.base_device) for mode, model in models.items()}
    steps = {mode: make_step(model, params[mode], batch) for mode, model in models.items()}
    times: dict[str, dict[str, list[float]]] = {mode: {"step": [], "measure": [], "exchange": [], "batch": []}
                                                for mode in models}
    for mode in models:
        steps[mode]()  # warm-up: AdamW allocates its state
    for _ in range(args.steps):
        for mode in models:
            times[mode]["step"].append(timed(steps[mode], args.device))

    def exchange(mode):
        with bases[mode].swapped_in(models[mode]):
            pass

    for _ in range(args.repeats):
        for mode, model in models.items():
            times[mode]["measure"].append(timed(lambda: measure(model, probes, bases[mode]), args.device))
            times[mode]["exchange"].append(timed(lambda: exchange(mode), args.device))
    for mode, model in models.items():
        times[mode]["batch"].append(timed(lambda: measure(model, batch_probes, bases[mode], batch_size=args.batch),
                                          args.device))
    rows = {}
    for mode, model in models.items():
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        measure(model, probes, bases[mode])
        unchanged = all(torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
        t = {key: statistics.median(values) for key, values in times[mode].items()}
        rows[mode] = dict(
            base_tensors=len(bases[mode].values), base_bytes=bases[mode].nbytes,
            base_share_of_model=bases[mode].nbytes / full_bytes, step_seconds=t["step"],
            measurement_seconds=t["measure"], exchange_in_and_out_seconds=t["exchange"],
            overhead_at_default_every=t["measure"] / (DEFAULT_EVERY * t["step"]),
            measurement_in_steps=t["measure"] / t["step"], batch_kl_seconds=t["batch"],
            batch_kl_in_steps=t["batch"] / t["step"], batch_kl_store_bytes=args.batch * (args.seq - 1) * vocab * 4,
            measuring_left_the_model_bit_identical=unchanged, all_times=times[mode],
        )

    load = os.getloadavg()
    import transformers

    result = dict(
        model=args.model, parameters=total, model_bytes=full_bytes, device=args.device, base_device=args.base_device,
        probes=dict(samples=DEFAULT_SAMPLES, length=DEFAULT_LENGTH, scored_positions=probes.scored_tokens,
                    batch_size=DEFAULT_BATCH_SIZE, sampling_seconds=sampling,
                    base_log_prob_store_bytes=probes.scored_tokens * vocab * 4),
        every=DEFAULT_EVERY, train_batch=[args.batch, args.seq], steps=args.steps, repeats=args.repeats,
        threads=torch.get_num_threads(), rows=rows,
        machine=dict(cpus=os.cpu_count(), torch=torch.__version__, transformers=transformers.__version__,
                     python=platform.python_version(), load_average_at_end=[round(x, 1) for x in load],
                     gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None),
        date=datetime.date.today().isoformat(),
    )
    text = render(result)
    print(text)
    if not args.no_write:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, f"{args.name}.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(RESULTS, f"{args.name}.md"), "w") as f:
            f.write(text + "\n")
    return 0


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def render(r: dict) -> str:
    p, m = r["probes"], r["machine"]
    where = m["gpu"] or f"{m['cpus']} CPU cores, {r['threads']} torch threads"
    lines = [
        "# The forgetting monitor's cost",
        "",
        f"Command: `python benchmarks/forgetting_monitor_cost.py"
        f"{'' if r['device'] == 'cpu' else ' --device ' + r['device']}`  ",
        f"Model: {r['model']} shape ({r['parameters'] / 1e6:.1f}M parameters, random weights, fp32, "
        f"{_mib(r['model_bytes'])}), on {r['device']}; base kept on {r['base_device']}.  ",
        f"Probes: {p['samples']} samples of up to {p['length']} tokens ({p['scored_positions']:,} positions scored), "
        f"batch {p['batch_size']}; drawing them took {p['sampling_seconds']:.1f} s (once per run).  ",
        f"Training step: forward, backward and AdamW on a batch of {r['train_batch'][0]} x {r['train_batch'][1]} "
        f"tokens; median of {r['steps']} steps, measurements median of {r['repeats']}; the two models (same weights) "
        "alternate step by step and measurement by measurement.  ",
        f"Machine: {where}, torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; "
        f"{r['date']}; load average at the end {', '.join(map(str, m['load_average_at_end']))} (a shared machine).",
        "",
        "| | base kept | step | one measurement | of which exchanges | = steps | overhead at every=" + str(r["every"])
        + " | KL on the step's batch | = steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, row in r["rows"].items():
        lines.append(
            f"| {mode} | {_mib(row['base_bytes'])} ({row['base_share_of_model']:.0%} of the model, "
            f"{row['base_tensors']} tensors) | {row['step_seconds']:.2f} s | {row['measurement_seconds']:.2f} s | "
            f"{row['exchange_in_and_out_seconds']:.2f} s | "
            f"{row['measurement_in_steps']:.2f} | {row['overhead_at_default_every']:.2%} | "
            f"{row['batch_kl_seconds']:.2f} s | {row['batch_kl_in_steps']:.2f} |")
    first = next(iter(r["rows"].values()))
    lines += [
        "",
        f"- During a measurement the base's log-probabilities over all probes are held on the base's device: "
        f"{_mib(p['base_log_prob_store_bytes'])} (positions x vocabulary x 4 bytes), freed after it; the KL on the "
        f"step's batch would hold {_mib(first['batch_kl_store_bytes'])} for this batch, growing with batch x length.",
        "- Measuring left every weight bit-identical: "
        + ", ".join(f"{mode}: {row['measuring_left_the_model_bit_identical']}" for mode, row in r["rows"].items()) + ".",
        "- Overhead at every=N: one measurement / (N x step time); steps between measurements cost the callback "
        "one modulo. A measurement's cost is fixed (two forward passes over the probes and two exchanges of the "
        "kept values); a step's grows with its tokens, so larger batches see a smaller overhead.",
        "- Exchanges: the kept values swapped into the model and back (in and out), part of each measurement.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
