"""The hot path: what keeping fused tensors' frozen slices still costs per training step.

On a Phi-3-layout model (fused ``qkv_proj`` and ``gate_up_proj``), the same half trains six ways:

- ``none``:  the same flags, no mask (the frozen slices of fused tensors would move: timing only);
- ``fused``: hft_plugin's GradientMask (one fused call per optimizer step, before clipping): zeroes
  views of the frozen blocks with one ``torch._foreach_zero_``;
- ``dense``: the first version of it: one ``torch._foreach_mul_`` of the whole gradients by dense
  masks stored in the parameters' dtype;
- ``hooks``: a per-parameter autograd hook multiplying each fused gradient by its mask, every backward;
- ``regions``: what hft_plugin does by default now: region parameters (the optimizer owns only the
  trainable rows; the backward computes only their weight gradient), no mask;
- ``unfused``: the same units on a Llama-layout model of the same sizes (q, k, v, gate, up as
  separate tensors), frozen whole with requires_grad=False: no mask is needed at all.

Steps alternate between all of them in one process (rotating the order), so all see the same machine.
The cost of masking is also timed alone (mask applied to real gradients, many times), because on a
shared machine a 1% difference between two step medians is within the noise.

    python benchmarks/mask_overhead.py                 # writes benchmarks/results/mask_overhead.{md,json}
    python benchmarks/mask_overhead.py --steps 30 --layers 8
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from speed import machine  # noqa: E402

MODES = ("none", "fused", "dense", "hooks", "regions", "unfused")


def phi3_config(layers: int, hidden: int, intermediate: int, heads: int, vocab: int):
    from transformers import Phi3Config

    config = Phi3Config(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                        max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    return config


def build(kind: str, config, seed: int = 0):
    """The Phi-3 model of ``config``, or its Llama twin (same sizes, unfused projections)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "phi3":
            return Phi3ForCausalLM(config).train()
        twin = LlamaConfig(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                           num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                           num_key_value_heads=config.num_key_value_heads, vocab_size=config.vocab_size,
                           tie_word_embeddings=config.tie_word_embeddings, max_position_embeddings=4096)
        twin._attn_implementation = "sdpa"
        return LlamaForCausalLM(twin).train()


_UNFUSE = {"self_attn.qkv_proj:q": "self_attn.q_proj", "self_attn.qkv_proj:k": "self_attn.k_proj",
           "self_attn.qkv_proj:v": "self_attn.v_proj", "mlp.gate_up_proj:gate": "mlp.gate_proj",
           "mlp.gate_up_proj:up": "mlp.up_proj"}


def twin_selection(selection, llama):
    """The Phi-3 selection's units, named as the Llama twin's separate projections."""
    from hft_plugin import Selection, select_half

    keys = set()
    for key in selection.trainable_units:
        for fused, plain in _UNFUSE.items():
            key = key.replace(fused, plain)
        keys.add(key)
    base = select_half(llama, selection.config.round, config=selection.config)
    known = {u.key for u, _ in base.units()}
    missing = keys - known
    if missing:
        raise RuntimeError(f"cannot map units to the Llama twin: {sorted(missing)[:3]}")
    return Selection(selection.config, base.layout, frozenset(keys))


class Variant:
    def __init__(self, mode: str, config, round: int, lr: float = 1e-5):
        from hft_plugin import apply_selection, select_half

        self.mode = mode
        self.model = build("llama" if mode == "unfused" else "phi3", config)
        selection = select_half(build("phi3", config) if mode == "unfused" else self.model, round)
        if mode == "unfused":
            selection = twin_selection(selection, self.model)
        self.selection = selection
        # every variant but "regions" keeps partly trained tensors whole in the optimizer (the mask mechanism)
        self.handle = apply_selection(self.model, selection, partial="auto" if mode == "regions" else "mask")
        self.params = self.handle.parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.hooks = []
        if mode == "fused":
            self.handle.attach(self.optimizer)
        elif mode == "dense":
            self.dense = [(p, self.handle.trainable_mask(n, p.device).to(p.dtype)) for n, p in self.handle.masked_parameters.items()]
        elif mode == "hooks":
            for name, param in self.handle.masked_parameters.items():
                mask = self.handle.trainable_mask(name, param.device).to(param.dtype)
                self.hooks.append(param.register_hook(lambda grad, mask=mask: grad * mask))

    @property
    def masked_numel(self) -> int:
        return sum(p.numel() for p in self.handle.masked_parameters.values())

    def step(self, ids) -> float:
        start = time.perf_counter()
        self.model(input_ids=ids, labels=ids).loss.backward()
        if self.mode == "fused":
            self.handle.mask_gradients()  # as a trainer does, before clipping; the step pre-hook then skips
        elif self.mode == "dense":
            torch._foreach_mul_([p.grad for p, _ in self.dense], [m for _, m in self.dense])
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def time_alone(variant: Variant, ids, repeats: int) -> dict:
    """Seconds per application of the fused mask, and of the per-parameter hooks' multiplies, on real gradients."""
    variant.model(input_ids=ids, labels=ids).loss.backward()
    params = list(variant.handle.masked_parameters.items())
    grads = {n: p.grad.clone() for n, p in params}
    from hft_plugin.mechanisms.mask import GradientMask

    mask = GradientMask([p for _, p in params], [variant.handle.trainable_mask(n) for n, _ in params])
    dense = [variant.handle.trainable_mask(n, p.device).to(p.dtype) for n, p in params]
    fused, old, hooks = [], [], []
    for _ in range(repeats):
        for n, p in params:
            p.grad.copy_(grads[n])
        start = time.perf_counter()
        mask.apply()
        fused.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch._foreach_mul_([p.grad for _, p in params], dense)
        old.append(time.perf_counter() - start)
        start = time.perf_counter()
        for (n, p), m in zip(params, dense):  # what a hook does: a new masked gradient per parameter
            p.grad = grads[n] * m
        hooks.append(time.perf_counter() - start)
    variant.optimizer.zero_grad(set_to_none=True)
    return {"fused_mask_s": statistics.median(fused), "dense_mask_s": statistics.median(old),
            "hook_multiplies_s": statistics.median(hooks)}


def measure(steps: int, warmup: int, batch: int, seq: int, round: int, repeats: int, log=print, **sizes) -> dict:
    config = phi3_config(**sizes)
    variants = {mode: Variant(mode, config, round) for mode in MODES}
    gen = torch.Generator().manual_seed(1)
    times = {mode: [] for mode in MODES}
    for i in range(warmup + steps):
        ids = torch.randint(3, config.vocab_size, (batch, seq), generator=gen)
        order = MODES[i % len(MODES):] + MODES[:i % len(MODES)]
        for mode in order:
            elapsed = variants[mode].step(ids)
            if i >= warmup:
                times[mode].append(elapsed)
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    paired = {mode: statistics.median(a / b for a, b in zip(times[mode], times["none"])) for mode in MODES}
    alone = time_alone(variants["fused"], ids, repeats)
    fused = variants["fused"]
    result = dict(
        sizes=sizes, batch=batch, seq=seq, steps=steps, warmup=warmup, round=round,
        params=sum(p.numel() for p in fused.model.parameters()),
        masked_tensors=len(fused.handle.masked_parameters), masked_numel=fused.masked_numel,
        step_s=medians, step_vs_none_paired=paired,
        fused_overhead=medians["fused"] / medians["none"] - 1, hooks_overhead=medians["hooks"] / medians["none"] - 1,
        **alone,
    )
    result["dense_mask_bytes"] = sum(m.numel() * m.element_size() for _, m in variants["dense"].dense)
    result["fused_alone_share"] = alone["fused_mask_s"] / medians["none"]
    result["hooks_alone_share"] = alone["hook_multiplies_s"] / medians["none"]
    result["dense_alone_share"] = alone["dense_mask_s"] / medians["none"]
    result["dense_overhead"] = medians["dense"] / medians["none"] - 1
    result["hooks_vs_fused_alone"] = alone["hook_multiplies_s"] / alone["fused_mask_s"]
    for mode in MODES:
        log(f"{mode:>8}: median step {medians[mode] * 1e3:8.1f} ms   vs none (paired) {paired[mode]:.4f}")
    log(f"mask alone: fused {alone['fused_mask_s'] * 1e3:.2f} ms ({result['fused_alone_share']:.2%} of a step), "
        f"dense {alone['dense_mask_s'] * 1e3:.2f} ms ({result['dense_alone_share']:.2%}), "
        f"hook multiplies {alone['hook_multiplies_s'] * 1e3:.2f} ms ({result['hooks_alone_share']:.2%}), "
        f"hooks/fused {result['hooks_vs_fused_alone']:.1f}x")
    del variants
    gc.collect()
    return result


def write(result: dict, command: str) -> None:
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    result = dict(result, machine=machine(), command=command, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    with open(os.path.join(HERE, "results", "mask_overhead.json"), "w") as f:
        json.dump(result, f, indent=1)
    m, s = result["machine"], result["sizes"]
    st, pr = result["step_s"], result["step_vs_none_paired"]
    lines = [
        "# The cost of masking fused tensors", "",
        f"Command: `{command}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), torch {m['torch']}, "
        f"transformers {m.get('transformers', '?')}; load average at the end "
        f"{', '.join(f'{v:.1f}' for v in m.get('load_avg_at_end', ()))} (the cores were shared with other jobs)  ",
        f"Model: Phi-3 layout, {s['layers']} layers, hidden {s['hidden']}, intermediate {s['intermediate']}, "
        f"{s['heads']} heads, vocab {s['vocab']}: {result['params'] / 1e6:.1f}M parameters; round {result['round']}: "
        f"{result['masked_tensors']} partly trained fused tensors, {result['masked_numel'] / 1e6:.1f}M elements.  ",
        f"Steps: batch {result['batch']} x {result['seq']} tokens, AdamW, {result['warmup']} warm-up + "
        f"{result['steps']} measured steps per variant, alternating in one process; measured {result['date']}.", "",
        "| variant | what keeps frozen slices still | median step | vs none (paired median) |",
        "|---|---|---|---|",
        f"| none | nothing (timing baseline) | {st['none'] * 1e3:,.1f} ms | 1.000 |",
        f"| fused | GradientMask, once per step (zeroes frozen blocks) | {st['fused'] * 1e3:,.1f} ms | {pr['fused']:.4f} |",
        f"| dense | first version: dense-mask multiply, once per step | {st['dense'] * 1e3:,.1f} ms | {pr['dense']:.4f} |",
        f"| hooks | autograd hook per parameter | {st['hooks'] * 1e3:,.1f} ms | {pr['hooks']:.4f} |",
        f"| regions | region parameters (rows): no mask, no frozen weight gradient | {st['regions'] * 1e3:,.1f} ms "
        f"| {pr['regions']:.4f} |",
        f"| unfused | Llama twin, whole tensors frozen | {st['unfused'] * 1e3:,.1f} ms | {pr['unfused']:.4f} |",
        "",
        "| masking alone, on real gradients | time | share of a `none` step |",
        "|---|---|---|",
        f"| fused mask (GradientMask.apply) | {result['fused_mask_s'] * 1e3:.2f} ms | {result['fused_alone_share']:.2%} |",
        f"| first version: dense-mask `_foreach_mul_` | {result['dense_mask_s'] * 1e3:.2f} ms | {result['dense_alone_share']:.2%} |",
        f"| per-parameter hook multiplies | {result['hook_multiplies_s'] * 1e3:.2f} ms | {result['hooks_alone_share']:.2%} |",
        f"| hooks / fused | {result['hooks_vs_fused_alone']:.1f}x | |",
        "",
        f"Memory: the first version kept a dense mask per fused tensor in its dtype "
        f"({result['dense_mask_bytes'] / 2**20:,.1f} MiB here, as much as the fused weights themselves); "
        "the block version keeps only slice bounds.",
        "",
    ]
    with open(os.path.join(HERE, "results", "mask_overhead.md"), "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=30, help="timings of the mask alone")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.steps, args.warmup, args.batch, args.seq, args.round, args.repeats,
                     layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                     vocab=args.vocab)
    if not args.no_write:
        write(result, "python benchmarks/mask_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
