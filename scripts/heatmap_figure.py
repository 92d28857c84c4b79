"""Look at what we send: the heat-map secondary captures of one phantom study beside the
phantom's true lesion outline, as one PNG, for checking by eye that the heat sits on the lesions.

    .venv/bin/python scripts/heatmap_figure.py STUDY_FOLDER OUT.png [--checkpoint PATH] [--scale F]

STUDY_FOLDER is one study written by ``hrct-triage phantom`` (it holds ``lesion_masks.npz``).
The study goes through the worker's own analysis and output code; each SC is shown as a PACS
would show it (its RGB pixels, legend and text included) and, next to it, the lung-window slice
with the lesion mask outlined in green.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--scale", type=float, default=1.0, help="resize the sheet (0.5: half)")
    args = parser.parse_args()

    from hrct_triage.worker.method.checkpoints import default_checkpoint
    from hrct_triage.worker.method.model import load_model
    from hrct_triage.worker.method.pipeline import analyse_study
    from hrct_triage.worker.outputs import Analysed, write_outputs

    checkpoint = args.checkpoint or default_checkpoint()
    model = load_model(checkpoint, allow_untrained=False)
    paths = sorted(args.study.rglob("*.dcm"))
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    analysis, headers = analyse_study(study_uid, paths, model)
    masks = np.load(args.study / "lesion_masks.npz")
    by_uid = {str(u): i for i, u in enumerate(masks["sop_instance_uids"])}
    tiles: list[Image.Image] = []
    with tempfile.TemporaryDirectory() as scratch:
        records = write_outputs(
            Analysed(analysis, headers),
            generation=1,
            content_datetime=datetime(2026, 1, 1, tzinfo=UTC),
            predecessor=None,
            out_dir=Path(scratch),
        )
        for record, heat in zip(
            [r for r in records if r.kind == "sc"], analysis.heatmaps, strict=True
        ):
            sc = Image.fromarray(pydicom.dcmread(record.path).pixel_array)
            window = (heat.lung_window * 255).astype(np.uint8)
            truth = Image.fromarray(window).convert("RGB")
            mask = masks["masks"][by_uid[heat.sop_instance_uid]]
            edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
            pixels = np.array(truth)
            pixels[edge] = (0, 255, 0)
            truth = Image.fromarray(pixels).resize(sc.size)
            ImageDraw.Draw(truth).text((8, 8), "lesion mask (truth)", fill=(0, 255, 0))
            tiles.extend([sc, truth])
    width, height = tiles[0].size
    sheet = Image.new("RGB", (2 * width, height * (len(tiles) // 2)), "black")
    for index, tile in enumerate(tiles):
        sheet.paste(tile, ((index % 2) * width, (index // 2) * height))
    if args.scale != 1.0:
        sheet = sheet.resize((round(sheet.width * args.scale), round(sheet.height * args.scale)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(
        f"{args.out}: study probability {analysis.probability:.3f} "
        f"({'positive' if analysis.positive else 'negative'}), {len(tiles) // 2} heat maps"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
