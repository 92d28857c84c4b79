"""CPU time of writing phantom studies, one core, and the wall time of a parallel run.

    .venv/bin/python benchmarks/phantom_speed.py [--slices 64] [--workers 2] [--studies 4]

Training sets are phantoms by the hundred, so the cost of a study is a number the project plans
with. Each case writes one positive and one negative study in this process (CPU seconds of
``time.process_time``, so other load on the machine counts less than in wall time): the default
1 mm lung series, the 5 mm lung series the realism table compares, and a 256 x 256 study as the
tests write them. A last run writes ``--studies`` studies with ``--workers`` processes and
reports its wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--studies", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from hrct_triage.phantoms import write_phantom_studies

    cases: list[tuple[str, dict[str, Any]]] = [
        (f"{args.slices} x 1 mm LUNG, 512 x 512", {}),
        (f"{args.slices} x 5 mm LUNG, 512 x 512", {"thickness": 5.0}),
        (f"{args.slices} x 1 mm LUNG, 256 x 256", {"matrix": 256}),
    ]
    print("| study | covid CPU s | healthy CPU s |\n| --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for n, (name, options) in enumerate(cases):
            seconds = []
            for label in ("covid", "healthy"):
                started = time.process_time()
                write_phantom_studies(
                    Path(tmp) / f"{n}-{label}",
                    covid=int(label == "covid"),
                    healthy=int(label == "healthy"),
                    slices=args.slices,
                    seed=1,
                    **options,
                )
                seconds.append(time.process_time() - started)
            print(f"| {name} | {seconds[0]:.1f} | {seconds[1]:.1f} |", flush=True)
        started = time.perf_counter()
        half = args.studies // 2
        write_phantom_studies(
            Path(tmp) / "parallel",
            covid=half,
            healthy=args.studies - half,
            slices=args.slices,
            seed=2,
            workers=args.workers,
        )
        wall = time.perf_counter() - started
        print(
            f"\n{args.studies} studies of {args.slices} x 1 mm, {args.workers} workers: "
            f"{wall:.0f} s wall ({wall / args.studies:.1f} s a study)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
