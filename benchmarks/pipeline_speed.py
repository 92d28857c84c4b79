"""Worker path against the bare model, in the same process and run: what the work around it costs.

    .venv/bin/python benchmarks/pipeline_speed.py [--slices 300] [--repeat 2] [--checkpoint PATH]
        [--compile]

The worker path is what a task does after its claim: series selection, HU volume, lung slices,
preprocessing, batched forward with CAM, trimmed mean, heat maps, and the SR and SC objects built
and written ("SR ready"). The baseline is ``model.module(x)`` alone over the same preprocessed
lung slices, same batch size, memory format and autocast. A second baseline is the plain
forward as PyTorch runs it out of the box (what a GPU figure is judged against): fp32, eager,
default memory format; it is timed
where it differs from the bare forward (CUDA, or a CPU with bf16), as on an fp32-only CPU the two
are the same work. Each round times the bare forward and the worker path back to back, in
alternating order, so that a drift in the machine's speed (the bare forward took 20.0 to 23.3 s
from run to run on the 2-core development machine) does not always count against the one timed
second; ``--repeat`` rounds (CUDA synchronised), and the ratios of the best and of the medians
are printed last. ``--compile`` loads the worker's model with ``torch.compile`` on its features
(HRCT_COMPILE_MODEL); its warm-up is left out of the timings.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    import torch

    from hrct_triage.phantoms import write_phantom_studies
    from hrct_triage.worker.memory import keep_freed_memory
    from hrct_triage.worker.method.model import load_model
    from hrct_triage.worker.method.pipeline import analyse_study
    from hrct_triage.worker.method.preprocess import lung_slices, model_input
    from hrct_triage.worker.method.series import select_series
    from hrct_triage.worker.method.volume import load_volume
    from hrct_triage.worker.outputs import Analysed, write_outputs

    model = load_model(
        args.checkpoint, allow_untrained=args.checkpoint is None, compile_features=args.compile
    )
    plain = load_model(args.checkpoint, allow_untrained=args.checkpoint is None, bf16=False)
    plain.module.to(memory_format=torch.contiguous_format)
    # As the worker process does (worker.tasks): freed memory kept, long-lived objects frozen.
    keep_freed_memory()
    gc.freeze()

    def sync() -> None:
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)

    print(
        f"model {model.info.version} on {model.device} (bf16={model.bf16}), "
        f"torch threads {torch.get_num_threads()}, batch {args.batch_size}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        (study,) = write_phantom_studies(
            folder / "in", covid=1, healthy=0, slices=args.slices, seed=5
        )
        paths = sorted(study.folder.glob("*.dcm"))

        volume = load_volume(select_series(paths))
        lung = lung_slices(volume.hu, pixel_spacing=volume.pixel_spacing).nonzero()[0]
        inputs = model_input(
            volume.hu,
            indices=lung,
            size=model.info.input_size,
            width=model.info.window_width,
            level=model.info.window_level,
        )
        print(f"{len(paths)} files, {volume.shape[0]} thin slices, {len(lung)} lung slices")

        def bare() -> float:
            started = time.perf_counter()
            with (
                torch.inference_mode(),
                torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.bf16),
            ):
                for start in range(0, inputs.shape[0], args.batch_size):
                    batch = inputs[start : start + args.batch_size].to(model.device)
                    model.module(batch.contiguous(memory_format=torch.channels_last))
            sync()
            return time.perf_counter() - started

        def fp32_eager() -> float:
            started = time.perf_counter()
            with torch.inference_mode():
                for start in range(0, inputs.shape[0], args.batch_size):
                    plain.module(inputs[start : start + args.batch_size].to(plain.device))
            sync()
            return time.perf_counter() - started

        def worker_path(run: int) -> tuple[float, dict[str, float]]:
            started = time.perf_counter()
            analysis, headers = analyse_study(
                study.study_uid, paths, model, batch_size=args.batch_size
            )
            write_outputs(
                Analysed(analysis, headers),
                generation=run,
                content_datetime=datetime(2026, 1, 1, tzinfo=UTC),
                predecessor=None,
                out_dir=folder / f"out{run}",
            )
            sync()
            return time.perf_counter() - started, analysis.timings

        with_eager = model.device.type == "cuda" or model.bf16
        # warm-up: first-call allocations, kernel selection and compilation are not measured
        bare(), worker_path(0)
        if with_eager:
            fp32_eager()
        bare_times: list[float] = []
        eager_times: list[float] = []
        path_times: list[float] = []
        stages: dict[str, float] = {}
        for run in range(1, args.repeat + 1):
            if run % 2:
                bare_times.append(bare())
                elapsed, stages = worker_path(run)
            else:
                elapsed, stages = worker_path(run)
                bare_times.append(bare())
            path_times.append(elapsed)
            if with_eager:
                eager_times.append(fp32_eager())
            eager_run = f", fp32 eager {eager_times[-1]:.2f} s" if with_eager else ""
            print(
                f"run {run}: bare forward {bare_times[-1]:.2f} s{eager_run}, "
                f"worker path {elapsed:.2f} s (worker's forward stage {stages['forward']:.2f} s)"
            )
    print(
        "worker stages of the last run: " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items())
    )
    best_bare, best_path = min(bare_times), min(path_times)
    best_eager = min(eager_times) if eager_times else None
    eager = ""
    if best_eager is not None:
        eager = f", fp32 eager {best_eager:.2f} s ({len(lung) / best_eager:.1f} slices/s)"
    print(
        f"bare forward {best_bare:.2f} s ({len(lung) / best_bare:.1f} slices/s){eager}, "
        f"worker path to SR ready {best_path:.2f} s ({len(lung) / best_path:.1f} slices/s)"
    )
    print(
        f"ratio worker path / bare forward: best {best_path / best_bare:.2f}x, median "
        f"{statistics.median(path_times) / statistics.median(bare_times):.2f}x (target <= 1.3x)"
    )
    if best_eager is not None:
        print(f"ratio worker path speed / fp32 eager speed: {best_eager / best_path:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
