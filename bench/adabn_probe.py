"""Test-time BatchNorm adaptation, probed on one segmenter (bench/README.md, issue 14): every
BatchNorm's running statistics are re-estimated (a cumulative mean, model in eval mode otherwise)
from the images of ``--adapt-on`` at the model's infer_scale, and the holdout split is scored before
and after, on genseg's eval protocol.  The labels of the adaptation split are never read.

    .venv/bin/python bench/adabn_probe.py --model CKPT --data SHARDS --adapt-on holdout
    .venv/bin/python bench/adabn_probe.py --model CKPT --data SHARDS --adapt-on train   # the control
"""
from __future__ import annotations

import argparse

import torch

from genseg import engine
from genseg.loading import load
from jobs import eval_seg
from pipelines.shards import iter_split


@torch.no_grad()
def adapt_batchnorm(model: torch.nn.Module, images, infer_scale: float) -> int:
    """Re-estimate the BatchNorm statistics of ``model`` from ``images`` ((3, H, W) tensors)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None            # a cumulative average over every image seen
    model.eval()
    for m in norms:
        m.train()
    n = 0
    for image in images:      # the forward pass of evaluation, at infer_scale, with the norms in train mode
        engine.predict_logits(model, image[None], tuple(image.shape[-2:]), infer_scale)
        n += 1
    model.eval()
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="checkpoint directory or models:/ reference")
    ap.add_argument("--data", required=True, help="shards from `genseg prepare --holdout`")
    ap.add_argument("--adapt-on", default="holdout", help="the split whose images re-estimate the statistics")
    ap.add_argument("--split", default="holdout", help="the split scored")
    args = ap.parse_args()
    seg = load(args.model)
    before = eval_seg.run(seg, args.data, split=args.split)["miou"]
    n = adapt_batchnorm(seg.model, (img for img, _ in engine.eval_samples(iter_split(args.data, args.adapt_on))),
                        seg.config.infer_scale)
    after = eval_seg.run(seg, args.data, split=args.split)["miou"]
    flip = eval_seg.run(seg, args.data, split=args.split, flip=True)["miou"]
    print(f"{args.split} mIoU: {100 * before:.2f} plain; {100 * after:.2f} after adapting to {n} {args.adapt_on} "
          f"images; {100 * flip:.2f} adapted + flip TTA")


if __name__ == "__main__":
    main()
