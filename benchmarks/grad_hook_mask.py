"""Masking partly trained tensors: once per step before clipping (today) or a torch tensor hook.

The Trainer adapter zeroes the frozen rows of mask-mechanism tensors once per optimizer step, just
before the Trainer takes the gradient norm (it wraps ``Trainer._clip_grad_norm``/``_get_grad_norm``,
private methods: no public event fires between the backward and the norm). torch's public
alternative is ``Tensor.register_post_accumulate_grad_hook``: a hook per tensor that zeroes the
frozen rows each time a gradient is accumulated into ``.grad``. This script times both, side by side
in one process, on a tiny Llama built from a transformers ``LlamaConfig``; every projection of every
layer (q, k, v, o, gate, up, down) stands for a partly trained tensor with half its rows frozen
(alternate halves per layer):

- ``none``:  no mask (the frozen rows move: the timing baseline only);
- ``clip``:  today's way: ``GradientMask.apply()`` (hft_plugin.mechanisms.mask) once per optimizer step,
  after the last micro-batch's backward, before ``clip_grad_norm_``;
- ``hook``:  a post-accumulate-grad hook per tensor zeroing its frozen rows, every backward.

Steps alternate between the variants (rotating the order) on three copies of one model fed the same
batches, so all see the same machine; ``exact`` says whether ``hook`` ended bit-identical to
``clip`` and whether every frozen row of both is bit-identical to its start. Because a 1% difference
between step medians is within the noise of a shared machine, the masking is also timed alone, on
real gradients: one ``GradientMask.apply()`` against the hooks' calls of one step (one per tensor
per micro-batch).

    python benchmarks/grad_hook_mask.py                 # writes benchmarks/results/grad_hook_mask.{md,json}
    python benchmarks/grad_hook_mask.py --steps 10 --accumulation 1 4
"""

from __future__ import annotations

import argparse
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

VARIANTS = ("none", "clip", "hook")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama(layers: int, hidden: int, intermediate: int, heads: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).train()


def frozen_rows(model) -> dict[str, tuple[int, int]]:
    """name -> (start, stop) of the frozen rows: the first half in even layers, the second in odd ones."""
    rows = {}
    for name, param in model.named_parameters():
        if any(f".{p}." in name for p in PROJECTIONS):
            layer = int(name.split(".layers.")[1].split(".")[0])
            half = param.shape[0] // 2
            rows[name] = (0, half) if layer % 2 == 0 else (half, param.shape[0])
    return rows


def _zero_rows(start: int, length: int):
    def hook(param) -> None:  # a post-accumulate-grad hook returns nothing
        param.grad.narrow(0, start, length).zero_()
    return hook


class Variant:
    def __init__(self, kind: str, sizes: dict, lr: float = 1e-3):
        from hft_plugin.mechanisms.mask import GradientMask

        self.kind = kind
        self.model = llama(**sizes)
        params = dict(self.model.named_parameters())
        self.rows = frozen_rows(self.model)
        self.start = {n: params[n].detach()[a:b].clone() for n, (a, b) in self.rows.items()}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        self.hooks = []
        masked = [params[n] for n in self.rows]
        masks = []
        for name, (a, b) in self.rows.items():
            mask = torch.ones(params[name].shape, dtype=torch.bool)
            mask[a:b] = False
            masks.append(mask)
        self.mask = GradientMask(masked, masks)
        if kind == "hook":
            for name, (a, b) in self.rows.items():
                self.hooks.append(params[name].register_post_accumulate_grad_hook(_zero_rows(a, b - a)))

    def step(self, batches) -> tuple[float, float]:
        """(seconds for the backward passes and the mask, seconds for the whole step)."""
        start = time.perf_counter()
        for ids in batches:
            (self.model(input_ids=ids, labels=ids).loss / len(batches)).backward()
        if self.kind == "clip":
            self.mask.apply()
        masked = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        return masked - start, end - start

    def time_alone(self, batches, repeats: int) -> tuple[float, float]:
        """Seconds per step of the masking alone: (one GradientMask.apply(), the hooks of one step)."""
        for ids in batches:
            (self.model(input_ids=ids, labels=ids).loss / len(batches)).backward()
        params = dict(self.model.named_parameters())
        hooks = [(params[n], _zero_rows(a, b - a)) for n, (a, b) in self.rows.items()]
        fused, each = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            self.mask.apply()
            fused.append(time.perf_counter() - start)
            start = time.perf_counter()
            for _ in batches:
                for param, hook in hooks:
                    hook(param)
            each.append(time.perf_counter() - start)
        self.optimizer.zero_grad(set_to_none=True)
        return statistics.median(fused), statistics.median(each)

    def frozen_kept(self) -> bool:
        params = dict(self.model.named_parameters())
        return all(torch.equal(params[n].detach()[a:b], self.start[n]) for n, (a, b) in self.rows.items())


def measure(accumulation: int, steps: int, warmup: int, batch: int, seq: int, repeats: int, log=print,
            **sizes) -> dict:
    variants = {kind: Variant(kind, sizes) for kind in VARIANTS}
    gen = torch.Generator().manual_seed(1)
    backward = {kind: [] for kind in VARIANTS}
    whole = {kind: [] for kind in VARIANTS}
    for i in range(warmup + steps):
        batches = [torch.randint(3, sizes["vocab"], (batch, seq), generator=gen) for _ in range(accumulation)]
        order = VARIANTS[i % len(VARIANTS):] + VARIANTS[:i % len(VARIANTS)]
        for kind in order:
            part, total = variants[kind].step(batches)
            if i >= warmup:
                backward[kind].append(part)
                whole[kind].append(total)
    clip, hook = variants["clip"], variants["hook"]
    mask_alone, hooks_alone = clip.time_alone(batches, repeats)
    same = all(torch.equal(a, b) for a, b in zip(clip.model.parameters(), hook.model.parameters()))
    result = dict(
        accumulation=accumulation, steps=steps, warmup=warmup, batch=batch, seq=seq, sizes=sizes,
        params=sum(p.numel() for p in clip.model.parameters()), masked_tensors=len(clip.rows),
        masked_numel=sum(p.numel() for n, p in clip.model.named_parameters() if n in clip.rows),
        backward_and_mask_s={k: statistics.median(v) for k, v in backward.items()},
        step_s={k: statistics.median(v) for k, v in whole.items()},
        # paired: each measured step of one variant against the same batches' step of the other
        hook_vs_clip_step=statistics.median(h / c for h, c in zip(whole["hook"], whole["clip"])),
        hook_vs_clip_backward=statistics.median(h / c for h, c in zip(backward["hook"], backward["clip"])),
        clip_vs_none_step=statistics.median(c / n for c, n in zip(whole["clip"], whole["none"])),
        hook_vs_none_step=statistics.median(h / n for h, n in zip(whole["hook"], whole["none"])),
        mask_alone_s=mask_alone, hooks_alone_s=hooks_alone, hooks_vs_mask_alone=hooks_alone / mask_alone,
        exact=dict(hook_equals_clip=same, clip_frozen_kept=clip.frozen_kept(), hook_frozen_kept=hook.frozen_kept(),
                   none_frozen_kept=variants["none"].frozen_kept()),
    )
    log(f"accumulation {accumulation}: step none {result['step_s']['none'] * 1e3:.1f} ms, clip "
        f"{result['step_s']['clip'] * 1e3:.1f} ms, hook {result['step_s']['hook'] * 1e3:.1f} ms; hook/clip paired: "
        f"step {result['hook_vs_clip_step']:.4f}, backward+mask {result['hook_vs_clip_backward']:.4f}; masking alone: "
        f"apply {mask_alone * 1e3:.3f} ms, hooks {hooks_alone * 1e3:.3f} ms ({result['hooks_vs_mask_alone']:.1f}x); "
        f"exact {result['exact']}")
    return result


def verdict(results: list[dict]) -> str:
    """The rule the Trainer adapter follows: the hook replaces masking before the norm only if it is
    exact and no slower (step and masking alone) at every accumulation measured."""
    exact = all(r["exact"]["hook_equals_clip"] and r["exact"]["hook_frozen_kept"] for r in results)
    slower = [r["accumulation"] for r in results if r["hook_vs_clip_step"] > 1 or r["hooks_vs_mask_alone"] > 1]
    if exact and not slower:
        return "Verdict: the hook is exact and no slower; it can replace masking before the norm."
    why = [] if exact else ["not exact"]
    if slower:
        why.append(f"slower with {', '.join(map(str, slower))} micro-batch(es) per step")
    return f"Verdict: masking before the norm stays ({'; '.join(why)})."


def write(results: list[dict], command: str) -> None:
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    info = machine()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with open(os.path.join(HERE, "results", "grad_hook_mask.json"), "w") as f:
        json.dump(dict(results=results, machine=info, command=command, date=stamp), f, indent=1)
    first, sizes = results[0], results[0]["sizes"]
    lines = [
        "# Masking partly trained tensors: before clipping, or a post-accumulate-grad hook", "",
        f"Command: `{command}`  ",
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['threads']} torch threads), torch {info['torch']}, "
        f"transformers {info.get('transformers', '?')}; load average at the end "
        f"{', '.join(f'{v:.1f}' for v in info.get('load_avg_at_end', ()))} (the cores were shared with other jobs)  ",
        f"Model: Llama from a `LlamaConfig`, {sizes['layers']} layers, hidden {sizes['hidden']}, intermediate "
        f"{sizes['intermediate']}, vocab {sizes['vocab']}: {first['params'] / 1e6:.2f}M parameters; "
        f"{first['masked_tensors']} tensors with half their rows frozen "
        f"({first['masked_numel'] / 1e6:.2f}M elements).  ",
        f"Steps: batch {first['batch']} x {first['seq']} tokens per micro-batch, AdamW, clip 1.0, {first['warmup']} "
        f"warm-up + {first['steps']} measured steps per variant, alternating in one process; measured {stamp}.", "",
        "| micro-batches per step | none step | clip step | hook step | hook / clip, step (paired) "
        "| hook / clip, backward + mask (paired) | masking alone: clip, hooks (hooks / clip) "
        "| hook = clip, bit for bit | frozen rows kept (clip, hook) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, e = r["step_s"], r["exact"]
        lines.append(f"| {r['accumulation']} | {s['none'] * 1e3:.1f} ms | {s['clip'] * 1e3:.1f} ms | "
                     f"{s['hook'] * 1e3:.1f} ms | {r['hook_vs_clip_step']:.4f} | {r['hook_vs_clip_backward']:.4f} | "
                     f"{r['mask_alone_s'] * 1e3:.3f} ms, {r['hooks_alone_s'] * 1e3:.3f} ms "
                     f"({r['hooks_vs_mask_alone']:.1f}x) | "
                     f"{'yes' if e['hook_equals_clip'] else 'no'} | "
                     f"{'yes' if e['clip_frozen_kept'] else 'no'}, {'yes' if e['hook_frozen_kept'] else 'no'} |")
    lines += ["", "`clip`: `GradientMask.apply()` once per optimizer step before the norm (what the Trainer adapter "
              "does); `hook`: `Tensor.register_post_accumulate_grad_hook` per tensor, zeroing its frozen rows after "
              "every backward. A ratio above 1 means the hook is slower.", "", verdict(results), ""]
    with open(os.path.join(HERE, "results", "grad_hook_mask.md"), "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=384)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--accumulation", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=50, help="timings of the masking alone")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = dict(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                 vocab=args.vocab)
    results = [measure(k, args.steps, args.warmup, args.batch, args.seq, args.repeats, **sizes)
               for k in args.accumulation]
    if not args.no_write:
        write(results, " ".join(["python benchmarks/grad_hook_mask.py", *(argv if argv is not None else sys.argv[1:])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
