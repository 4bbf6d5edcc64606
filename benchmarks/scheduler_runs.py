"""Abandoned `DODEScheduler` runs: threads, memory and live schedulers left behind; deepcopy/pickle during a run.

A pipeline run that stops early (an exception, an interrupt, a timeout) drops its scheduler mid-run. Each measured
run builds a scheduler, calls `set_timesteps(10)`, makes two `step()`s on SDXL-sized latents (1×4×128×128, a zero
"network") and drops it. After N runs and `gc.collect()` the table gives the thread count, the resident memory
growth and how many of the dropped schedulers are still alive (weak references). It then tries `copy.deepcopy` and
`pickle.dumps` at three points of a run (before `set_timesteps`, after 2 of 10 steps, after the last step) and
whether a copy taken mid-run finishes with the original's result. Each tree is measured in its own interpreter.
Usage: PYTHONPATH=. python benchmarks/scheduler_runs.py [--quick] [--out-dir docs] [--before PATH]
  (--before: a checkout of the package before the thread-free scheduler, e.g. `git archive 0a2b344 dode_lightning`)
"""
from __future__ import annotations

import copy
import gc
import json
import os
import pickle
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import torch

from benchmarks.common import machine, markdown_table, parser, print_and_write_section

SHAPE = (1, 4, 128, 128)
STEPS = 10


def rss_mib() -> float:
    """Resident set size of this process (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_steps(scheduler, x: torch.Tensor, steps: int) -> torch.Tensor:
    for t in scheduler.timesteps[scheduler.step_index : scheduler.step_index + steps]:
        x = scheduler.step(torch.zeros_like(x) + 0.1 * x, t, x).prev_sample
    return x


def try_copies(scheduler) -> str:
    results = []
    for name, copier in (("deepcopy", copy.deepcopy), ("pickle", lambda s: pickle.loads(pickle.dumps(s)))):
        try:
            copier(scheduler)
            results.append(f"{name} ok")
        except Exception as err:  # the measured outcome, reported as is
            results.append(f"{name}: {type(err).__name__}: {str(err)[:60]}")
    return "; ".join(results)


def measure(runs: int) -> dict:
    """Measured in this interpreter, on whatever `dode_lightning` is first on the path."""
    from dode_lightning.diffusers_scheduler import DODEScheduler

    torch.manual_seed(0)
    x0 = torch.randn(SHAPE)
    warm = DODEScheduler(solver="dpm_solver_pp_2m")
    warm.set_timesteps(STEPS)
    run_steps(warm, x0, STEPS)
    del warm
    gc.collect()
    threads, rss = threading.active_count(), rss_mib()
    alive = []
    for _ in range(runs):
        scheduler = DODEScheduler(solver="dpm_solver_pp_2m")
        scheduler.set_timesteps(STEPS)
        run_steps(scheduler, x0, 2)
        alive.append(weakref.ref(scheduler))
        del scheduler
    gc.collect()
    result = {
        "threads": [threads, threading.active_count()],
        "rss": [rss, rss_mib()],
        "alive": sum(ref() is not None for ref in alive),
    }
    scheduler = DODEScheduler(solver="dpm_solver_pp_2m")
    result["before set_timesteps"] = try_copies(scheduler)
    scheduler.set_timesteps(STEPS)
    x = run_steps(scheduler, x0, 2)
    result["mid-run (2 of 10 steps)"] = try_copies(scheduler)
    try:
        twin = copy.deepcopy(scheduler)
        result["copy finishes as the original"] = f"max |Δ| = {float((run_steps(twin, x, STEPS) - run_steps(scheduler, x, STEPS)).abs().max()):.1e}"
    except Exception as err:
        result["copy finishes as the original"] = f"{type(err).__name__}"
        run_steps(scheduler, x, STEPS)
    result["after the last step"] = try_copies(scheduler)
    return result


def measure_tree(tree: Path, runs: int) -> dict:
    """`measure` in a fresh interpreter with `tree` first on the path."""
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{Path(__file__).resolve().parents[1]}"}
    code = f"import json, benchmarks.scheduler_runs as b; print(json.dumps(b.measure({runs})))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parser(__doc__)
    args.add_argument("--before", default=None, help="package checkout measured as 'before'")
    args = args.parse_args()
    runs = 20 if args.quick else 300
    trees = ([("before", Path(args.before).resolve())] if args.before else []) + [("after", Path(__file__).resolve().parents[1])]
    results = {label: measure_tree(tree, runs) for label, tree in trees}
    rows = [
        [label, f"{r['threads'][0]} → {r['threads'][1]}", f"{r['rss'][0]:.0f} → {r['rss'][1]:.0f} (+{r['rss'][1] - r['rss'][0]:.0f})",
         f"{r['alive']} / {runs}"]
        for label, r in results.items()
    ]
    table = markdown_table(["scheduler", "threads", "RSS MiB", "dropped schedulers alive after gc"], rows)
    points = ["before set_timesteps", "mid-run (2 of 10 steps)", "after the last step", "copy finishes as the original"]
    copies = markdown_table(["scheduler", *points], [[label, *(r[p] for p in points)] for label, r in results.items()])
    command = "PYTHONPATH=. python benchmarks/scheduler_runs.py" + (" --quick" if args.quick else "") + (" --before <checkout>" if args.before else "")
    text = (
        f"## Abandoned scheduler runs (`{command}`)\n\n{machine()}. {runs} runs of DPM-Solver++(2M), "
        f"each dropped after 2 of {STEPS} steps on {'×'.join(map(str, SHAPE))} latents, then `gc.collect()`.\n\n{table}\n\n"
        f"deepcopy / pickle at three points of a run:\n\n{copies}\n\n'before' is the package at 0a2b344 (worker-thread "
        "scheduler, `git archive 0a2b344 dode_lightning`); 'after' the generator driven by `step()`.\n"
    )
    print_and_write_section(args, "scheduler_runs", text)


if __name__ == "__main__":
    main()
