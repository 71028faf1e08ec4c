"""Latent diffusion against the pixel model, side by side, at the latent model's resolution (issue 13).

    .venv/bin/python bench/latent_vs_pixel.py --pixel REF --latent REF --segmenter REF --data SHARDS \\
        [--num 32] [--workdir DIR] [--tag _camvid]

Both models draw ``--num`` samples conditioned on the same first val label maps.  The latent model
draws at its decoded size; the pixel model draws at its own size and its samples are upsampled
(bilinear) to that size, as `genseg edit` pastes them.  Both go through `eval gen`'s protocol at that
size (jobs/eval_gen.run): FD and KID in the segmenter's features with bootstrap spreads and the
real-vs-real noise floor at the same n, the segmenter's mIoU on the samples against its ceiling on
the real images, seconds per sample, and inpainting in seeded held-out holes (PSNR, SSIM, seam
contrast; the pixel model fills each hole at its size and is composited at full size).  Training cost
is read from each model's MLflow run (sum of ``epoch_seconds``).  Writes
``bench/results/latent_vs_pixel<tag>.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


class Upsampled:
    """A generator seen at a larger ``size``: samples upsampled, holes filled at the model's size and
    composited at ``size`` (genseg.editing's paste: outside pixels unchanged)."""

    def __init__(self, gen, size: tuple[int, int]):
        self.gen, self.image_size = gen, tuple(size)
        for name in ("kind", "conditional", "num_classes", "ignore_index", "weights", "epoch", "path", "settings"):
            setattr(self, name, getattr(gen, name))

    def generate(self, condition, n, seed, **kw):
        out = self.gen.generate(condition, n, seed, **kw)
        x = out.permute(0, 3, 1, 2).float()
        up = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return up.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)

    def inpaint(self, images, holes, condition, seed, **kw):
        from genseg.editing import EditOptions, _fill

        opts = EditOptions(resample=kw.pop("resample", 1), feather=0, seed=seed)
        out = [_fill(self.gen, images[i].numpy(), holes[i].numpy().astype(bool),
                     None if condition is None else condition[i].numpy(), opts, kw)
               for i in range(len(images))]
        return torch.stack([torch.from_numpy(o) for o in out])


def training_cost(resolved, tracking_uri: str) -> dict:
    """Seconds of training (sum of the run's ``epoch_seconds``) and epochs, from its MLflow run."""
    from mlflow.tracking import MlflowClient

    if not getattr(resolved, "run_id", None):
        return {"train_seconds": None, "epochs": None}
    hist = MlflowClient(tracking_uri).get_metric_history(resolved.run_id, "epoch_seconds")
    return {"train_seconds": round(sum(m.value for m in hist), 1), "epochs": len(hist)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pixel", required=True, help="pixel-space diffusion REF")
    ap.add_argument("--latent", required=True, help="latent diffusion REF")
    ap.add_argument("--segmenter", required=True, help="segmenter REF (features and mIoU)")
    ap.add_argument("--data", required=True, help="pixel shards (the real images and label maps)")
    ap.add_argument("--num", type=int, default=32)
    ap.add_argument("--inpaint-num", type=int, default=8)
    ap.add_argument("--workdir", default="genseg-runs")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    from genseg import tracking
    from genseg.loading import load
    from jobs import eval_gen

    uri = tracking.setup(Path(args.workdir), tracking.default_tracking_uri(args.workdir))
    out = {"protocol": {"num": args.num, "data": str(Path(args.data).resolve()), "date": time.strftime("%Y-%m-%d")}}
    with tempfile.TemporaryDirectory() as tmp:
        seg_res = tracking.resolve(args.segmenter, uri, f"{tmp}/s")
        seg = load(seg_res, expect="segmenter")
        lat_res = tracking.resolve(args.latent, uri, f"{tmp}/l")
        latent = load(lat_res, expect="generator")
        pix_res = tracking.resolve(args.pixel, uri, f"{tmp}/p")
        pixel = Upsampled(load(pix_res, expect="generator"), latent.image_size)
        for name, gen, res in (("latent", latent, lat_res), ("pixel", pixel, pix_res)):
            t0 = time.perf_counter()
            figures = eval_gen.run(gen, seg, args.data, num=args.num, inpaint_num=args.inpaint_num,
                                   model_ref=args.latent if name == "latent" else args.pixel,
                                   segmenter_ref=args.segmenter)
            figures.update(training_cost(res, uri))
            figures["model_size"] = list(getattr(gen, "gen", gen).image_size)
            out[name] = figures
            print(f"--- {name} ({time.perf_counter() - t0:.0f} s; trained {figures['train_seconds']} s over "
                  f"{figures['epochs']} epochs)\n{eval_gen.format_report(figures)}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"latent_vs_pixel{args.tag}.json"
    path.write_text(json.dumps(out, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
