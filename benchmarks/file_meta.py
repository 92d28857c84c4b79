"""The spool's hand-built File Meta against pydicom's ``write_file_meta_info``, in the same run.

    .venv/bin/python benchmarks/file_meta.py [--calls 20000] [--rounds 7]

The listener writes a File Meta in front of every data set it stores. ``listener.spool`` builds
those bytes itself instead of calling pydicom's writer; this script checks that both give the
same bytes and prints what each costs per instance, and the ratio, so that the hand-built code
keeps its place only while the gain is worth its lines. Rounds alternate between the two so
that a drift in the machine's speed does not always count against the one timed second.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SOP_INSTANCE = "1.2.826.0.1.3680043.8.498.10921312425614183519727040101245013"
EXPLICIT_LITTLE = "1.2.840.10008.1.2.1"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    from hrct_triage.listener.spool import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
    from hrct_triage.listener.spool import file_meta as hand_built

    def with_pydicom(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class_uid
        meta.MediaStorageSOPInstanceUID = sop_instance_uid
        meta.TransferSyntaxUID = transfer_syntax_uid
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION
        out = DicomBytesIO()
        out.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(out, meta, enforce_standard=True)
        return out.getvalue()

    arguments = (CT_IMAGE, SOP_INSTANCE, EXPLICIT_LITTLE)
    if hand_built(*arguments) != with_pydicom(*arguments):
        print("the hand-built File Meta differs from pydicom's", file=sys.stderr)
        return 1

    def per_call(build: Callable[[str, str, str], bytes]) -> float:
        started = time.perf_counter()
        for _ in range(args.calls):
            build(*arguments)
        return (time.perf_counter() - started) / args.calls

    times: dict[str, list[float]] = {"hand-built": [], "pydicom": []}
    for round_number in range(args.rounds):
        order = [("hand-built", hand_built), ("pydicom", with_pydicom)]
        for name, build in order if round_number % 2 else reversed(order):
            times[name].append(per_call(build))
    for name, values in times.items():
        print(
            f"{name}: best {min(values) * 1e6:.1f} us, "
            f"median {statistics.median(values) * 1e6:.1f} us per File Meta"
        )
    best = min(times["pydicom"]) / min(times["hand-built"])
    median = statistics.median(times["pydicom"]) / statistics.median(times["hand-built"])
    print(f"ratio pydicom / hand-built: best {best:.0f}x, median {median:.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
