"""CamVid segmentation on one GPU with genseg's model, losses, class weights, optimizer, schedule and
evaluation protocol, in plain PyTorch (no Ray, no MLflow): the GPU recipe of issue 14, and a fast way
to measure what moves the holdout figure.

    python bench/gpu_seg.py --root ../shared/data/camvid --holdout 0006R0 \\
        --config bench/configs/camvid_gpu.yaml --out bench/results/gpu_seg --tag resnet34

The whole data set lives on the GPU (uint8), and augmentation runs there in batches: one affine
resample per image does the random scale, the crop and the flip, with the image bilinear and the labels
nearest on the same grid (so they stay aligned), then the photometric jitter, gamma and blur, and
(``mix``) CutMix or ClassMix, of ``genseg.data.transforms``.  Every ``--eval-every`` epochs it scores val (CamVid's, all 0016E5) and the
holdout split (the training frames of the ``--holdout`` sequences, never trained on) at full
resolution, logits resized to the label before the argmax, as ``genseg eval seg`` does.  At the end:
flip test-time augmentation of the last model and of the model best on holdout, per-class IoU, and a
picture of holdout frames (image | truth | prediction | error map).

Writes ``<out>/<tag>.json`` (curves, best and last figures, per class, timings) and ``<out>/<tag>.png``.
This is not the Ray Train path (``genseg train seg --gpu``): bench/gpu_check.sh measures that.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genseg import config as config_lib  # noqa: E402
from genseg import engine  # noqa: E402
from genseg.config import SegConfig  # noqa: E402
from genseg.data.classes import CAMVID, CAMVID_VOID  # noqa: E402
from genseg.data.transforms import MEAN, STD, gaussian_blur, mix_batch  # noqa: E402
from genseg.data.weighting import inverse_sqrt_weights, median_frequency_weights, parse_class_weights  # noqa: E402
from genseg.losses import get_loss  # noqa: E402
from genseg.metrics import ConfusionMatrix  # noqa: E402
from genseg.models import build_segmenter  # noqa: E402
from genseg.viz import quad, save_png, stack_rows  # noqa: E402

IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def load_split(root: Path, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """CamVid's ``<split>/`` images (PNG or JPEG) and ``<split>annot/`` PNG labels, void -> 255."""
    names, images, masks = [], [], []
    for f in sorted(p for p in (root / split).iterdir() if p.suffix.lower() in IMAGE_EXTS):
        m = np.asarray(Image.open(root / f"{split}annot" / f"{f.stem}.png"), dtype=np.uint8).copy()
        m[m == CAMVID_VOID] = 255
        names.append(f.stem)
        images.append(np.asarray(Image.open(f).convert("RGB"), dtype=np.uint8))
        masks.append(m)
    return names, np.stack(images), np.stack(masks)


def class_weights(text: str | None, masks: np.ndarray, k: int):
    name, cap = parse_class_weights(text)
    if name in (None, "none"):
        return None
    counts = np.bincount(masks[masks != 255].ravel(), minlength=k)[:k]
    manifest = {"class_pixels": counts.tolist(), "splits": {"train": {"class_pixels": counts.tolist()}},
                "classes": {"weights": list(CAMVID.weights or [])}}
    if name == "median-freq":
        w = median_frequency_weights(manifest)
    elif name == "inv-sqrt":
        w = inverse_sqrt_weights(manifest)
    elif name == "dataset":
        w = tuple(CAMVID.weights)
    else:
        w = tuple(float(v) for v in str(name).split(","))
    return tuple(min(float(v), cap) for v in w) if cap else tuple(w)


class GpuAugment:
    """Batched scale + crop + flip (one affine grid per image), photometric changes and (``mix``)
    CutMix / ClassMix with the next image of the batch, on the device."""

    def __init__(self, cfg: SegConfig, crop: tuple[int, int], gen: torch.Generator):
        self.cfg, self.crop, self.gen = cfg, crop, gen
        self.rng = random.Random(cfg.seed)                           # genseg's mix_batch draws from a Random

    def _u(self, n, lo, hi, device):
        return torch.rand(n, generator=self.gen, device="cpu").to(device) * (hi - lo) + lo

    def __call__(self, images: torch.Tensor, masks: torch.Tensor):
        cfg, (ch, cw) = self.cfg, self.crop
        b, _, h, w = images.shape
        dev = images.device
        s = self._u(b, cfg.scale_min, cfg.scale_max, dev)            # zoom: the crop covers (ch/s, cw/s) source px
        half_h, half_w = ch / (s * h), cw / (s * w)                  # crop half-extent in normalised coords
        # crop centre: anywhere that keeps the crop inside the image, or centred when the crop is larger
        cy = (self._u(b, -1, 1, dev) * (1 - half_h).clamp(min=0))
        cx = (self._u(b, -1, 1, dev) * (1 - half_w).clamp(min=0))
        flip = (torch.rand(b, generator=self.gen) < (0.5 if cfg.hflip else 0.0)).to(dev)
        sx = torch.where(flip, -half_w, half_w)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = sx, cx
        theta[:, 1, 1], theta[:, 1, 2] = half_h, cy
        grid = F.affine_grid(theta, (b, 3, ch, cw), align_corners=False)
        x = F.grid_sample(images.float() / 255.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # labels: nearest on the same grid; outside the image (zeros padding of label + 1) -> ignore
        m = F.grid_sample(masks[:, None].float() + 1, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        m = (m[:, 0] - 1).round().long()
        m[(m < 0) | (m >= cfg.num_classes)] = cfg.ignore_index
        inside = F.grid_sample(torch.ones_like(x[:, :1]), grid, mode="nearest", padding_mode="zeros",
                               align_corners=False)
        x = self.photometric(x)
        x = torch.where(inside > 0, x, torch.full_like(x, MEAN))     # padding is the mean, as RandomCrop pads
        return mix_batch((x - MEAN) / STD, m, cfg.mix, cfg.mix_p, self.rng, cfg.ignore_index)

    def photometric(self, x: torch.Tensor) -> torch.Tensor:
        cfg, b, dev = self.cfg, x.shape[0], x.device
        if cfg.jitter > 0:
            grey = lambda t: (0.299 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2])[:, None]  # noqa: E731
            for op in torch.randperm(3, generator=self.gen).tolist():
                f = self._u(b, 1 - cfg.jitter, 1 + cfg.jitter, dev).view(b, 1, 1, 1)
                if op == 0:
                    x = x * f
                elif op == 1:
                    mean = grey(x).mean(dim=(2, 3), keepdim=True)
                    x = (x - mean) * f + mean
                else:
                    g = grey(x)
                    x = (x - g) * f + g
                x = x.clamp(0, 1)
        if cfg.gamma > 0:
            gamma = torch.exp(self._u(b, -cfg.gamma, cfg.gamma, dev)).view(b, 1, 1, 1)
            x = x.clamp(0, 1) ** gamma
        if cfg.blur > 0:
            pick = (torch.rand(b, generator=self.gen) < cfg.blur).nonzero().flatten().tolist()
            if pick:
                sigma = float(self._u(1, 0.3, 1.5, "cpu")[0])
                blurred = torch.stack([gaussian_blur(x[i], sigma) for i in pick])
                x = x.clone()
                x[pick] = blurred
        return x


@torch.no_grad()
def evaluate(model, images, masks, cfg, device, flip=False, keep=0, batch=16):
    model.eval()
    cm = ConfusionMatrix(cfg.num_classes, cfg.ignore_index)
    kept = []
    for i in range(0, len(images), batch):
        x = (images[i: i + batch].float() / 255.0 - MEAN) / STD
        y = masks[i: i + batch].long()
        logits = engine.predict_logits(model, x, tuple(y.shape[-2:]), cfg.infer_scale, device, cfg.amp, flip=flip)
        pred = logits.argmax(1)
        cm.update(pred, y)
        for j in range(min(keep - len(kept), len(x))):
            kept.append((x[j].cpu(), y[j].cpu(), pred[j].cpu()))
    model.train()
    res = cm.compute()
    return res, kept


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="CamVid root (train/, trainannot/, val/, valannot/)")
    ap.add_argument("--holdout", default="0006R0", help="training sequences held out as the holdout split")
    ap.add_argument("--config", help="YAML of SegConfig fields")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--class-weights", default="inv-sqrt")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--minutes", type=float, default=0,
                    help="fit the run into this many minutes of training: after 3 epochs the epoch count (and the LR "
                         "schedule with it) shrinks to what fits; 0 = the config's epochs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images of each split (smoke test)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", required=True)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True          # fixed crop and evaluation sizes
    cfg = config_lib.load_yaml(SegConfig, args.config) if args.config else SegConfig()
    cfg = config_lib.replace(cfg, {"num_classes": 11, "ignore_index": 255, **config_lib.parse_overrides(args.set)})
    root = Path(args.root)
    names, tr_img, tr_msk = load_split(root, "train")
    _, va_img, va_msk = load_split(root, "val")
    prefixes = tuple(p for p in args.holdout.split(",") if p)
    held = np.array([n.startswith(prefixes) for n in names]) if prefixes else np.zeros(len(names), bool)
    if prefixes and not held.any():
        raise SystemExit(f"--holdout {args.holdout}: no training frame starts with it")
    ho_img, ho_msk = tr_img[held], tr_msk[held]
    tr_img, tr_msk = tr_img[~held], tr_msk[~held]
    if args.limit:
        tr_img, tr_msk, va_img, va_msk = tr_img[:args.limit], tr_msk[:args.limit], va_img[:args.limit], va_msk[:args.limit]
        ho_img, ho_msk = ho_img[:args.limit], ho_msk[:args.limit]
    weights = class_weights(args.class_weights, tr_msk, cfg.num_classes)
    cfg = config_lib.replace(cfg, {"class_weights": weights})
    to = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    tr_img, tr_msk = to(tr_img).permute(0, 3, 1, 2).contiguous(), to(tr_msk)
    va_img, va_msk = to(va_img).permute(0, 3, 1, 2).contiguous(), to(va_msk)
    ho_img, ho_msk = to(ho_img).permute(0, 3, 1, 2).contiguous(), to(ho_msk)
    n_train = len(tr_img)
    print(f"[{args.tag}] {n_train} train / {len(va_img)} val / {len(ho_img)} holdout ({args.holdout}); "
          f"{cfg.backbone} {cfg.arch} w{cfg.width} norm {cfg.norm}, loss {cfg.loss}, weights {args.class_weights}, "
          f"jitter {cfg.jitter} gamma {cfg.gamma} blur {cfg.blur} mix {cfg.mix}, {cfg.epochs} epochs x bs {cfg.batch_size}, "
          f"lr {cfg.lr}; data loaded in {time.perf_counter() - t_start:.1f}s on {device}", flush=True)

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_segmenter(cfg).to(device).to(memory_format=torch.channels_last)
    optimizer = engine.make_optimizer(model, cfg)
    steps = max(1, n_train // cfg.batch_size)
    scheduler = engine.make_scheduler(optimizer, cfg.schedule, cfg.epochs, cfg.warmup_epochs, steps)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.amp == "fp16" else None
    loss_fn = get_loss(cfg.loss)
    wt = engine.class_weights(cfg)
    wt = wt.to(device) if wt is not None else None
    augment = GpuAugment(cfg, tuple(cfg.crop or tr_img.shape[-2:]), gen)

    curves, best, best_state = [], {"val": (-1.0, -1), "holdout": (-1.0, -1)}, None
    train_seconds, images_seen = 0.0, 0
    t_train0 = t_after_first = time.perf_counter()
    deadline = t_train0 + 60 * args.minutes if args.minutes else float("inf")
    planned = cfg.epochs
    epoch = 0
    while epoch < cfg.epochs:
        if epoch == 4 and args.minutes:          # fit the schedule into the budget, evaluations included
            # epochs 2-4: the first one holds cuDNN's autotuning and warm-up
            per_epoch = 1.2 * (time.perf_counter() - t_after_first) / 3     # + a share for the evaluations
            fits = epoch + int((deadline - time.perf_counter()) / per_epoch)
            if fits < cfg.epochs:
                cfg = config_lib.replace(cfg, {"epochs": max(fits, epoch + 1)})
                scheduler = engine.make_scheduler(optimizer, cfg.schedule, cfg.epochs, cfg.warmup_epochs, steps)
                for _ in range(epoch * steps):
                    scheduler.step()
                print(f"[{args.tag}] {per_epoch:.2f}s per epoch: {cfg.epochs} epochs fit in {args.minutes} min "
                      f"(planned {planned})", flush=True)
            else:
                print(f"[{args.tag}] {per_epoch:.2f}s per epoch: all {cfg.epochs} epochs fit in {args.minutes} min",
                      flush=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        order = torch.randperm(n_train, generator=gen).to(device)
        total = torch.zeros((), device=device)
        for step in range(steps):
            idx = order[step * cfg.batch_size: (step + 1) * cfg.batch_size]
            x, y = augment(tr_img[idx], tr_msk[idx])
            x = x.contiguous(memory_format=torch.channels_last)
            with engine.autocast(device, cfg.amp):
                logits = model(x)
            loss = loss_fn(logits.float(), y, wt, cfg.ignore_index)
            engine.backward_step(loss, optimizer, scaler)
            scheduler.step()
            total += loss.detach()
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - t0
        images_seen += steps * cfg.batch_size
        if epoch == 0:
            t_after_first = time.perf_counter()
        if (epoch + 1) % args.eval_every == 0 or epoch == cfg.epochs - 1:
            va, _ = evaluate(model, va_img, va_msk, cfg, device)
            ho, _ = evaluate(model, ho_img, ho_msk, cfg, device) if len(ho_img) else ({"miou": float("nan")}, [])
            row = {"epoch": epoch + 1, "train_loss": float(total) / steps, "val_miou": va["miou"], "holdout_miou": ho["miou"],
                   "lr": optimizer.param_groups[0]["lr"], "train_seconds": round(train_seconds, 2)}
            curves.append(row)
            if va["miou"] > best["val"][0]:
                best["val"] = (va["miou"], epoch + 1)
            if len(ho_img) and ho["miou"] > best["holdout"][0]:
                best["holdout"] = (ho["miou"], epoch + 1)
                best_state = copy.deepcopy(model.state_dict())
            print(f"[{args.tag}] epoch {epoch + 1}: loss {row['train_loss']:.4f}, val {100 * va['miou']:.2f}, "
                  f"holdout {100 * ho['miou']:.2f} ({train_seconds:.0f}s training, "
                  f"{images_seen / max(train_seconds, 1e-9):.0f} img/s)", flush=True)
        epoch += 1

    last_epoch = curves[-1]["epoch"] if curves else 0
    names_k = list(CAMVID.names)
    out = {"tag": args.tag, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "config": config_lib.asdict(cfg), "class_weights": args.class_weights,
           "planned_epochs": planned, "holdout": args.holdout, "counts": {"train": n_train, "val": len(va_img), "holdout": len(ho_img)},
           "epochs_run": last_epoch, "train_seconds": round(train_seconds, 1),
           "train_img_per_s": round(images_seen / max(train_seconds, 1e-9), 1), "curves": curves,
           "best_val": {"miou": best["val"][0], "epoch": best["val"][1]},
           "best_holdout": {"miou": best["holdout"][0], "epoch": best["holdout"][1]}}
    for label, state in (("last", None), ("best_holdout_model", best_state)):
        if label != "last" and state is None:
            continue
        m = model if state is None else copy.deepcopy(model)
        if state is not None:
            m.load_state_dict(state)
        figures = {}
        for split, (im, ms) in (("val", (va_img, va_msk)), ("holdout", (ho_img, ho_msk))):
            if not len(im):
                continue
            plain, kept = evaluate(m, im, ms, cfg, device, keep=4 if split == "holdout" else 0)
            tta, _ = evaluate(m, im, ms, cfg, device, flip=True)
            figures[split] = {"miou": plain["miou"], "pixel_acc": plain["pixel_acc"], "mean_acc": plain["mean_acc"],
                              "miou_flip_tta": tta["miou"],
                              "per_class_iou": {n: (None if math.isnan(v) else v) for n, v in zip(names_k, plain["iou"])}}
            if kept and label == "best_holdout_model":
                save_png(stack_rows([quad(i, y, p, CAMVID.palette, cfg.ignore_index) for i, y, p in kept]),
                         Path(args.out) / f"{args.tag}.png")
        out[label] = figures
    out["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.tag}.json").write_text(json.dumps(out, indent=1))
    last = out["last"]
    print(f"[{args.tag}] done: last (epoch {last_epoch}) val {100 * last['val']['miou']:.2f} / holdout "
          f"{100 * last.get('holdout', {}).get('miou', float('nan')):.2f} (flip TTA "
          f"{100 * last.get('holdout', {}).get('miou_flip_tta', float('nan')):.2f}); best val "
          f"{100 * best['val'][0]:.2f} @ {best['val'][1]}, best holdout {100 * best['holdout'][0]:.2f} @ "
          f"{best['holdout'][1]}; {out['train_img_per_s']} img/s, {out['wall_seconds']}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
