"""What the installed start-up hook (hft-plugin.pth) costs a Python process that does not use HFT.

Interpreter start-up, HFT_ENABLE unset, in fresh processes of the same interpreter, interleaved
(A B A B ...) so drift in machine load hits both alike:

* ``with hook``:    ``python -S -c "import site; site.main()"``: site's normal work, our .pth included.
* ``without hook``: the same, with site told to skip ``hft-plugin.pth`` and nothing else.

Both run ``-S`` plus the same ``site.main()`` so the only difference is the hook's line. Also
shown for information: the same with ``HFT_ENABLE=1`` (the hook imports the bootstrap module and
wrapt and registers the post-import hooks), and the cost of the .pth line itself measured in
process with timeit (site.addpackage on the installed file: open, read, compile, run the line). The figure is the difference of the medians; the goal is under 5 ms.

    python benchmarks/startup.py [--runs 60]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import time
import timeit

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PTH_NAME = "hft-plugin.pth"

WITH_HOOK = "import site; site.main()"
WITHOUT_HOOK = (
    "import site; _add = site.addpackage; "
    f"site.addpackage = lambda d, n, k: k if n == {PTH_NAME!r} else _add(d, n, k); site.main()"
)


def installed_pth() -> str:
    for directory in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        path = os.path.join(directory, PTH_NAME)
        if os.path.isfile(path):
            return path
    sys.exit(f"{PTH_NAME} is not installed in {sysconfig.get_paths()['purelib']}: pip install -e . first")


def start(code: str, environ: dict) -> tuple[float, float]:
    """Wall time and CPU time (user + system, from the child's rusage) of one interpreter run.
    CPU time is the steadier figure on a shared machine: waiting for a core does not count."""
    begin = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-S", "-c", code], env=environ)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - begin
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"interpreter failed with {child.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60)
    args = parser.parse_args()
    pth = installed_pth()
    off = {k: v for k, v in os.environ.items() if not k.startswith("HFT_")}
    on = dict(off, HFT_ENABLE="1")
    cases = {"with hook": (WITH_HOOK, off), "without hook": (WITHOUT_HOOK, off), "with hook, HFT_ENABLE=1": (WITH_HOOK, on)}
    for code, environ in cases.values():  # warm the OS caches
        start(code, environ)
    times: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(args.runs):
        order = list(cases) if i % 2 == 0 else list(reversed(cases))
        for name in order:
            wall, used = start(*cases[name])
            times[name].append(wall)
            cpu[name].append(used)

    # What site does with our file, in process: open, read, compile and run the line.
    import site

    saved = os.environ.pop("HFT_ENABLE", None)
    try:
        number = 2000
        directory, name = os.path.split(pth)
        per_exec = min(timeit.repeat(lambda: site.addpackage(directory, name, set()), number=number, repeat=5)) / number
    finally:
        if saved is not None:
            os.environ["HFT_ENABLE"] = saved

    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    cpu_medians = {name: statistics.median(values) * 1e3 for name, values in cpu.items()}
    added = medians["with hook"] - medians["without hook"]
    added_enabled = medians["with hook, HFT_ENABLE=1"] - medians["without hook"]
    added_cpu = cpu_medians["with hook"] - cpu_medians["without hook"]
    added_cpu_enabled = cpu_medians["with hook, HFT_ENABLE=1"] - cpu_medians["without hook"]
    rows = [(name, medians[name], statistics.quantiles([t * 1e3 for t in times[name]], n=4), cpu_medians[name])
            for name in cases]
    print(f"interpreter start-up, {args.runs} runs each, interleaved ({platform.python_version()}, {platform.machine()}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"{'case':<28}{'wall median ms':>15}{'q1 ms':>9}{'q3 ms':>9}{'CPU median ms':>15}")
    for name, median, (q1, _, q3), used in rows:
        print(f"{name:<28}{median:>15.2f}{q1:>9.2f}{q3:>9.2f}{used:>15.2f}")
    print(f"added by the hook, HFT_ENABLE unset: wall {added:+.2f} ms, CPU {added_cpu:+.2f} ms (goal < 5 ms)")
    print(f"added with HFT_ENABLE=1:             wall {added_enabled:+.2f} ms, CPU {added_cpu_enabled:+.2f} ms")
    print(f"site.addpackage on hft-plugin.pth in process (open+read+compile+run), HFT_ENABLE unset: "
          f"{per_exec * 1e6:.1f} us (best of 5)")

    os.makedirs(RESULTS, exist_ok=True)
    result = {
        "benchmark": "startup",
        "command": "python benchmarks/startup.py --runs %d" % args.runs,
        "python": platform.python_version(),
        "runs": args.runs,
        "load_average": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
        "wall_median_ms": medians,
        "cpu_median_ms": cpu_medians,
        "added_wall_ms_unset": added,
        "added_cpu_ms_unset": added_cpu,
        "added_wall_ms_enabled": added_enabled,
        "added_cpu_ms_enabled": added_cpu_enabled,
        "pth_line_us_unset": per_exec * 1e6,
        "goal_ms": 5.0,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    with open(os.path.join(RESULTS, "startup.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    with open(os.path.join(RESULTS, "startup.md"), "w") as handle:
        handle.write(f"# Start-up cost of the hook ({result['date']})\n\n`{result['command']}`\n\n")
        handle.write(f"Load average {result['load_average']:.1f} on {result['cpu_count']} shared cores while it ran.\n\n")
        handle.write("| case | wall median ms | q1 ms | q3 ms | CPU median ms |\n| --- | --- | --- | --- | --- |\n")
        for name, median, (q1, _, q3), used in rows:
            handle.write(f"| {name} | {median:.2f} | {q1:.2f} | {q3:.2f} | {used:.2f} |\n")
        handle.write(f"\nAdded by the hook with HFT_ENABLE unset: **wall {added:+.2f} ms, CPU {added_cpu:+.2f} ms** "
                     f"(goal < 5 ms); with HFT_ENABLE=1: wall {added_enabled:+.2f} ms, CPU {added_cpu_enabled:+.2f} ms. "
                     f"site.addpackage on the .pth in process (open, read, compile, run; HFT_ENABLE unset): "
                     f"{per_exec * 1e6:.1f} µs, best of 5.\n")


if __name__ == "__main__":
    main()
