"""Object-removal example: input | removed region | result, for one or more images.

    .venv/bin/python bench/object_removal.py --model DIFFUSION_REF --segmenter SEG_REF \
        --image ../shared/data/camvid/val/0016E5_07959.png [--image ...] --remove car,pedestrian,bicyclist \
        [--steps 50] [--resample 2] [--tag _camvid]

Runs the same code as `genseg edit --remove`, checks that every pixel outside the edited region
is bit-identical to the input, and writes bench/results/object_removal{tag}.png and .json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models:/genseg-diffusion@champion")
    ap.add_argument("--segmenter", default="models:/genseg-segmenter@champion")
    ap.add_argument("--image", action="append", required=True)
    ap.add_argument("--remove", required=True)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--resample", type=int, default=2)
    ap.add_argument("--dilate", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crop", action="store_true", help="only the region: fill a box around it at the model's size")
    ap.add_argument("--margin", type=int, default=16)
    ap.add_argument("--workdir", default="genseg-runs")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    import numpy as np

    from genseg import imageio, tracking
    from genseg.editing import EditOptions
    from genseg.loading import load
    from genseg.viz import save_png
    from jobs import edit_job
    from jobs.runtime import resolve

    rt = resolve(args.workdir, None, None)
    tracking.setup(rt.workdir, rt.tracking_uri)
    tmp = Path(tempfile.mkdtemp())
    gen_ref = tracking.resolve(args.model, rt.tracking_uri, dst=tmp / "d")
    seg_ref = tracking.resolve(args.segmenter, rt.tracking_uri, dst=tmp / "s")
    gen, seg = load(gen_ref, expect="generator"), load(seg_ref, expect="segmenter")
    opts = EditOptions(resample=args.resample, dilate=args.dilate, seed=args.seed, crop=args.crop, margin=args.margin)
    sampling = {"sampler": "ddim", "steps": args.steps}
    rows, records = [], []
    for i, path in enumerate(args.image):
        t0 = time.perf_counter()
        res = edit_job.run(gen, seg, imageio.read_image(path), str(tmp / f"out{i}.png"), remove=args.remove,
                           opts=opts, sampling=sampling)
        seconds = time.perf_counter() - t0
        image = imageio.read_image(path)
        result = imageio.read_image(res["out"])
        region = imageio.read_image(res["mask"])[..., 0] > 0
        identical = bool(np.array_equal(image[~region], result[~region]))
        shown = image.copy()
        shown[region] = (0.4 * shown[region] + 0.6 * np.array([255, 0, 255])).astype(np.uint8)
        rows.append(np.concatenate([image, shown, result], axis=1))
        records.append({"image": path, "edited_pixels": res["edited_pixels"], "size": res["size"],
                        "outside_region_bit_identical": identical, "seconds": round(seconds, 2),
                        "seam_contrast": res["boundary"]["ratio"],
                        "seam_contrast_input": edit_job.boundary(image, region)["ratio"]})
        print(f"{path}: {res['edited_pixels']} pixels edited, outside bit-identical: {identical}, seam contrast "
              f"{res['boundary']['ratio']:.2f} (input {records[-1]['seam_contrast_input']:.2f}), {seconds:.1f}s",
              flush=True)
    picture = save_png(np.concatenate(rows, axis=0), ROOT / "bench" / "results" / f"object_removal{args.tag}.png")
    out = {"benchmark": "object_removal", "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
           "remove": args.remove, "options": {**opts.__dict__, **sampling},
           "models": {"generator": gen_ref.describe(), "segmenter": seg_ref.describe()}, "images": records, "picture": str(picture.relative_to(ROOT)),
           "picture_layout": "input | removed region (magenta) | result"}
    path = picture.with_suffix(".json")
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {picture} and {path}")


if __name__ == "__main__":
    main()
