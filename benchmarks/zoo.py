"""select_half on every causal-LM type of the installed transformers.

For each name in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: build the default config on the meta device
(``AutoConfig.for_model(t)``, then ``AutoModelForCausalLM.from_config`` under
``torch.device("meta")``: no weights exist), run ``select_half`` (category, ratio 0.5) for rounds 0
and 1, and record the layout that read it, the layers found, the trainable share of the layers, the
shares per role, the time of each call, or the error. A type whose default config does not build
is "unbuildable" and not counted.

Each type runs in one worker process (one at a time: the machine is shared) with a time limit, so
a hang or a crash costs one row, not the run. Writes ``benchmarks/results/zoo.json`` and
``benchmarks/results/zoo.md`` and prints the table.

    python benchmarks/zoo.py                    # the whole zoo (a few minutes)
    python benchmarks/zoo.py mamba jamba rwkv   # some types
    python benchmarks/zoo.py --units mamba      # also print each type's first layers, unit by unit
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import queue
import sys
import time
from typing import Any

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TOLERANCE = 0.01  # the goal: each round's layer share within 1 percentage point of the ratio
TIME_GOAL_S = 1.0
BUILD_LIMIT_S = 30.0  # "meta-buildable": builds from its default config within this time
REPEATS = 3  # select_half calls per round; the time reported is the fastest


def zoo_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def build_meta(model_type: str, **overrides: Any):
    """The model of ``model_type`` from its default config, on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **overrides)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def stacks(layout) -> list[str]:
    """The lists the layers were found in, with how many layers each gave: ``model.layers x32``."""
    import re

    counts: dict[str, set[str]] = {}
    for layer in layout.layers:
        for unit in layer:
            match = re.match(r"(.*?)\.(\d+)(\.|:|$)", unit.key)
            if match:
                counts.setdefault(match.group(1), set()).add(match.group(2))
    return [f"{name} x{len(indices)}" for name, indices in counts.items()]


def probe(model_type: str, units: bool = False) -> dict[str, Any]:
    """Build ``model_type`` on meta and read it: one row of the table."""
    from hft_plugin import HFTError, select_half

    row: dict[str, Any] = {"model_type": model_type}
    start = time.perf_counter()
    try:
        model = build_meta(model_type)
    except Exception as exc:  # a default config that does not build: not part of the zoo's count
        row.update(status="unbuildable", error=f"{type(exc).__name__}: {_first_line(exc)}")
        return row
    row["build_s"] = round(time.perf_counter() - start, 3)
    row["model_class"] = type(model).__name__
    if row["build_s"] > BUILD_LIMIT_S:
        row.update(status="unbuildable", error=f"built in {row['build_s']:.0f} s (limit {BUILD_LIMIT_S:.0f} s)")
        return row
    try:
        selections, times, first_times, cpu_times = [], [], [], []
        for number in (0, 1):
            runs, cpu = [], []
            for _ in range(REPEATS):
                start, start_cpu = time.perf_counter(), time.process_time()
                selection = select_half(model, number, strategy="category", ratio=0.5)
                runs.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            selections.append(selection)
            first_times.append(runs[0])
            times.append(min(runs))  # the least disturbed of the calls: the CPU is shared
            cpu_times.append(min(cpu))
    except HFTError as exc:
        row.update(status="error", error=f"{type(exc).__name__}: {exc}")
        return row
    except Exception as exc:  # a crash: the reader should have raised a clear error instead
        row.update(status="crash", error=f"{type(exc).__name__}: {_first_line(exc)}")
        return row
    first, second = selections
    stats = first.stats()
    layout = first.layout
    roles = {g: v["total"] for g, v in stats["roles"].items()}
    row.update(
        status="read",
        layout=first.layout_name,
        layers=len(layout.layers),
        stacks=stacks(layout),
        units=sum(len(layer) for layer in layout.layers),
        layer_params=stats["layer_params"],
        outside_share=round(stats["outside_params"] / stats["total_params"], 4) if stats["total_params"] else 0.0,
        role_shares={g: round(n / stats["layer_params"], 4) for g, n in roles.items()},
        share_r0=first.trainable_ratio,
        share_r1=second.trainable_ratio,
        role_ratio_r0={g: round(v["ratio"], 4) for g, v in stats["roles"].items()},
        rounds_differ=first.trainable_units != second.trainable_units,
        time_r0_s=round(times[0], 4),
        time_r1_s=round(times[1], 4),
        first_call_s=round(max(first_times), 4),
        cpu_s=round(max(cpu_times), 4),
    )
    row["meets_goals"] = (
        abs(row["share_r0"] - 0.5) <= TOLERANCE and abs(row["share_r1"] - 0.5) <= TOLERANCE
        and row["rounds_differ"] and max(times) < TIME_GOAL_S
    )
    if units:
        row["first_layers"] = [
            [(u.key, u.group, u.numel, first.is_trainable(u.key)) for u in layer] for layer in layout.layers[:2]
        ]
    return row


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


# -- running every type in a worker process, one at a time, with a time limit ---------------------------


def _worker(tasks, results, units: bool) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    for model_type in iter(tasks.get, None):
        try:
            results.put(probe(model_type, units))
        except BaseException as exc:  # keep the worker alive for the next type
            results.put({"model_type": model_type, "status": "crash", "error": f"{type(exc).__name__}: {_first_line(exc)}"})


def run(types: list[str], timeout_s: float, units: bool = False, progress=print) -> list[dict[str, Any]]:
    context = multiprocessing.get_context("spawn")

    def start():
        tasks, results = context.Queue(), context.Queue()
        process = context.Process(target=_worker, args=(tasks, results, units), daemon=True)
        process.start()
        return process, tasks, results

    process, tasks, results = start()
    rows = []
    for model_type in types:
        tasks.put(model_type)
        try:
            # the first type also pays for the worker's imports
            row = results.get(timeout=timeout_s + (60 if not rows else 0))
        except queue.Empty:
            row = {"model_type": model_type, "status": "timeout", "error": f"no answer within {timeout_s:.0f} s"}
            process.kill()
            process.join()
            process, tasks, results = start()
        if not process.is_alive():  # died hard (segfault, out of memory)
            row = {"model_type": model_type, "status": "crash", "error": f"worker exited with {process.exitcode}"}
            process, tasks, results = start()
        rows.append(row)
        progress(_line(row))
    tasks.put(None)
    process.join(timeout=10)
    return rows


# -- the table ---------------------------------------------------------------------------------


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    buildable = [r for r in rows if r["status"] != "unbuildable"]
    read = [r for r in buildable if r["status"] == "read"]
    good = [r for r in read if r["meets_goals"]]
    return {
        "types": len(rows),
        "meta_buildable": len(buildable),
        "read": len(read),
        "read_within_goals": len(good),
        "read_share": round(len(good) / len(buildable), 4) if buildable else 0.0,
        "errors": [r["model_type"] for r in buildable if r["status"] == "error"],
        "crashes": [r["model_type"] for r in buildable if r["status"] in ("crash", "timeout")],
        "off_goal": [r["model_type"] for r in read if not r["meets_goals"]],
        "generic": sum(1 for r in read if r["layout"] == "generic"),
        "named": sum(1 for r in read if r["layout"] != "generic"),
        "max_time_s": max((max(r["time_r0_s"], r["time_r1_s"]) for r in read), default=0.0),
        "max_cpu_s": max((r["cpu_s"] for r in read), default=0.0),
        "over_time_goal": [r["model_type"] for r in read if max(r["time_r0_s"], r["time_r1_s"]) >= TIME_GOAL_S],
        "max_share_error_pp": round(100 * max((max(abs(r["share_r0"] - 0.5), abs(r["share_r1"] - 0.5)) for r in read), default=0.0), 3),
    }


def _line(row: dict[str, Any]) -> str:
    if row["status"] != "read":
        return f"{row['model_type']:<28} {row['status']:<11} {row.get('error', '')[:150]}"
    return (f"{row['model_type']:<28} {row['layout']:<20} {row['layers']:>4} {row['share_r0']:>8.4f} "
            f"{row['share_r1']:>8.4f} {max(row['time_r0_s'], row['time_r1_s']):>7.3f}"
            + ("" if row["meets_goals"] else "  OFF GOAL"))


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any], meta: dict[str, Any]) -> str:
    out = [
        "# select_half on the transformers causal-LM zoo",
        "",
        f"Produced by `{meta['command']}` on {meta['date']} (transformers {meta['transformers']}, "
        f"torch {meta['torch']}, Python {meta['python']}, {meta['machine']}). Category strategy, ratio 0.5, "
        "rounds 0 and 1, default config of each type built on the meta device. Time: wall-clock seconds "
        f"of one `select_half` call (read the model, draw the half), the slower round, each round the "
        f"fastest of {REPEATS} calls: the 2-core CPU is shared with other jobs, so single calls vary "
        "by 2x; the JSON also has each type's slowest first call (`first_call_s`). CPU: the CPU "
        "seconds of the same call, which contention for the cores does not inflate.",
        "",
        f"- causal-LM types: {summary['types']}; meta-buildable from their default config: {summary['meta_buildable']}",
        f"- read within the goals (share within {TOLERANCE * 100:g} pp of 0.5 at rounds 0 and 1, rounds differ, "
        f"under {TIME_GOAL_S:g} s each): **{summary['read_within_goals']} of {summary['meta_buildable']} "
        f"({summary['read_share']:.1%})**; read by a named layout: {summary['named']}, by the generic reader: {summary['generic']}",
        f"- read but off a goal: {', '.join(summary['off_goal']) or 'none'}",
        f"- clear errors (LayoutError): {', '.join(summary['errors']) or 'none'}",
        f"- crashes or timeouts: {', '.join(summary['crashes']) or 'none'}",
        f"- largest share error: {summary['max_share_error_pp']} pp; slowest call: {summary['max_time_s']:.3f} s "
        f"wall-clock, {summary['max_cpu_s']:.3f} s of CPU time; load average {meta['load']} (start, end of the run)",
        "",
        "Role shares are each role's share of the layers' parameters (attention = every token mixer; "
        "router = expert routers and gates). Outside = parameters outside the layers (embeddings, "
        "heads, final norms, projectors), which train whole by default.",
        "",
        "| model type | layout | layers | stacks | round 0 | round 1 | time (s) | CPU (s) | roles (att/mlp/norm/router/other) | outside | note |",
        "|---|---|---:|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        if r["status"] == "read":
            roles = "/".join(f"{100 * r['role_shares'].get(g, 0):.0f}" for g in ("attention", "mlp", "norm", "router", "other"))
            note = "" if r["meets_goals"] else "off goal"
            out.append(
                f"| {r['model_type']} | {r['layout']} | {r['layers']} | {'; '.join(r['stacks'])} | "
                f"{r['share_r0']:.4f} | {r['share_r1']:.4f} | {max(r['time_r0_s'], r['time_r1_s']):.3f} | {r['cpu_s']:.3f} | "
                f"{roles} | {r['outside_share']:.1%} | {note} |"
            )
        else:
            error = r.get("error", "").replace("|", "\\|").replace("\n", " ")[:220]
            out.append(f"| {r['model_type']} | {r['status']} | | | | | | | | | {error} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("types", nargs="*", help="model types (default: every causal-LM type)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per type (build + 2 selections)")
    parser.add_argument("--units", action="store_true", help="print the first two layers of each type, unit by unit")
    parser.add_argument("--out", default=RESULTS, help="directory for zoo.json and zoo.md (whole-zoo runs only)")
    args = parser.parse_args(argv)
    import torch
    import transformers

    types = args.types or zoo_types()
    load_start = os.getloadavg()[0]
    print(f"{'model type':<28} {'layout':<20} {'lay':>4} {'round 0':>8} {'round 1':>8} {'time s':>7}")
    rows = run(types, args.timeout, args.units)
    summary = summarize(rows)
    if args.units:
        for row in rows:
            for index, layer in enumerate(row.get("first_layers", [])):
                print(f"\n{row['model_type']} layer {index}")
                for key, group, numel, trains in layer:
                    print(f"    {key:<70} {group:<10} {numel:>14,} {'train' if trains else ''}")
    print(json.dumps(summary, indent=1))
    if not args.types:
        meta = {
            "command": "python benchmarks/zoo.py",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": f"{os.cpu_count()} CPUs",
            "load": f"{load_start:.1f}, {os.getloadavg()[0]:.1f}",
        }
        os.makedirs(args.out, exist_ok=True)
        for row in rows:
            row.pop("first_layers", None)
        with open(os.path.join(args.out, "zoo.json"), "w") as f:
            json.dump({"meta": meta, "summary": summary, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "zoo.md"), "w") as f:
            f.write(markdown(rows, summary, meta))
        print(f"wrote {args.out}/zoo.json and zoo.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
