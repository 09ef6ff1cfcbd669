#!/usr/bin/env python3
"""`make fuzz`: run the kernel-vs-cowfs parity machine for a fixed time in each mode.

    python scripts/fuzz.py [--minutes 10] [--modes redirect_off,redirect_on,...] [--steps 50]
                           [--backend cowfs|kernel] [--max-divergences 3]

Each mode runs for --minutes (default 10) in rounds of fresh random examples
(Hypothesis "fuzz" profile, no example database).  A progress line (examples,
steps, divergences) is printed at least every 30 seconds.  Every divergence
is shrunk by Hypothesis and printed as the steps that reproduce it (paste
them into tests/test_parity.py as a regression test).  A mode stops early
after --max-divergences divergences.  Exit status: 0 when no mode diverged,
1 otherwise.  Needs root (kernel overlay) and FUSE.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback

from hypothesis import Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from cowfs.testing.harness import MODES, Divergence
from cowfs.testing.machine import parity_machine
from cowfs.testing.mounts import availability, mounts_under
from cowfs.testing.plugin import register_profiles

DEFAULT_MODES = ["redirect_off", "redirect_on", "userxattr", "many_layers"]
# the parity machine draws ordinary lower layers only: the data-only modes are the differential scenarios'
PARITY_MODES = [name for name, mode in MODES.items() if not mode.data_only]
ROUND_EXAMPLES = 20
PROGRESS_EVERY = 30.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="time per mode (default 10)")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES),
                    help=f"comma-separated, of {', '.join(PARITY_MODES)} (default {','.join(DEFAULT_MODES)})")
    ap.add_argument("--steps", type=int, default=None, help="steps per example (default: the fuzz profile's)")
    ap.add_argument("--backend", default="cowfs", choices=("cowfs", "kernel"),
                    help="'kernel' compares the kernel with itself, to check the harness")
    ap.add_argument("--max-divergences", type=int, default=3, help="stop a mode after this many (default 3)")
    args = ap.parse_args(argv)

    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in PARITY_MODES]
    if unknown:
        ap.error(f"not a mode of the parity machine: {', '.join(unknown)} (one of: {', '.join(PARITY_MODES)})")
    missing = {k: v for k, v in availability().items() if v and (k == "kernel" or args.backend == "cowfs")}
    if missing:
        print("fuzz: cannot run here: " + "; ".join(f"{k}: {v}" for k, v in missing.items()), file=sys.stderr)
        return 2

    register_profiles()
    base = settings.get_profile("fuzz")
    run_settings = settings(base, max_examples=ROUND_EXAMPLES, phases=[Phase.generate, Phase.shrink],
                            **({"stateful_step_count": args.steps} if args.steps else {}))
    os.umask(0o022)
    summary = []
    for mode in modes:
        summary.append(run_mode(mode, args, run_settings))

    print("\n== fuzz summary ==")
    total_div = 0
    for mode, examples, steps, divergences, seconds in summary:
        total_div += len(divergences)
        print(f"{mode:16} {examples:6} examples {steps:8} steps {len(divergences):3} divergence(s) "
              f"in {seconds / 60:.1f} min")
        for d in divergences:
            print("    - " + d.splitlines()[0][:200])
    leftovers = [m for m in mounts_under("/tmp") if "cowfs-parity-" in m[0]]
    if leftovers:
        print(f"fuzz: mounts left behind: {leftovers}", file=sys.stderr)
        return 1
    return 1 if total_div else 0


def run_mode(mode, args, run_settings):
    cls = parity_machine(mode, backend=args.backend)
    start = time.monotonic()
    deadline = start + args.minutes * 60
    divergences: list[str] = []
    done = threading.Event()

    def progress():
        while not done.wait(PROGRESS_EVERY):
            c = cls.counters
            print(f"[{mode}] {time.monotonic() - start:6.0f}s  examples={c['examples']} steps={c['steps']} "
                  f"divergences={len(divergences)}", flush=True)

    ticker = threading.Thread(target=progress, daemon=True)
    ticker.start()
    print(f"[{mode}] fuzzing {args.backend} against the kernel for {args.minutes:g} min", flush=True)
    try:
        while time.monotonic() < deadline and len(divergences) < args.max_divergences:
            try:
                run_state_machine_as_test(cls, settings=run_settings)
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # a divergence (or a harness failure): report it in full
                text = "".join(traceback.format_exception(e))
                kind = "DIVERGENCE" if isinstance(e, Divergence) else "FAILURE"
                divergences.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                print(f"\n[{mode}] {kind} #{len(divergences)}:\n{text}", flush=True)
    finally:
        done.set()
        ticker.join()
    c = cls.counters
    seconds = time.monotonic() - start
    print(f"[{mode}] done: examples={c['examples']} steps={c['steps']} divergences={len(divergences)} "
          f"in {seconds:.0f}s", flush=True)
    return mode, c["examples"], c["steps"], divergences, seconds


if __name__ == "__main__":
    sys.exit(main())
