"""``genseg eval gen``: generation quality in the project's own segmenter feature space.

Real images are the first ``num`` of a shard split, resized to the diffusion model's size.
Generated images are sampled on the same label maps (label-conditioned models) or
unconditionally.  Reports FD and KID on the segmenter's pooled stride-32 features, the
segmenter's mIoU on conditioned samples with its mIoU on the real images as the ceiling, and
PSNR/SSIM inside seeded rectangular holes for inpainting.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from genseg.data.transforms import to_tensors
from genseg.diffusion.data import diffusion_batch
from genseg.diffusion.conditioning import encode_labels
from genseg.diffusion.inpaint import inpaint
from genseg.diffusion.sampling import from_uint8, sample, to_uint8
from genseg.diffusion.schedules import make_train_scheduler
from genseg.engine import predict_logits
from genseg.errors import InputError
from genseg.metrics import ConfusionMatrix
from genseg.metrics.generation import (frechet_distance, frechet_distance_std, kernel_inception_distance,
                                       psnr_in_mask, random_holes, ssim_in_mask)
from jobs.edit_job import load_segmenter
from jobs.sample_job import load_diffusion
from pipelines.shards import iter_split


def real_set(data: str, split: str, num: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> images ``(N, H, W, 3) uint8`` and masks ``(N, H, W)`` at the model size."""
    pairs = [diffusion_batch(batch, size, False, None) for batch in iter_split(data, split, limit=num)]
    if sum(len(x) for x, _ in pairs) < 2:
        raise InputError(f"{data} [{split}] has fewer than 2 images to evaluate against")
    return to_uint8(torch.cat([x for x, _ in pairs])), torch.cat([m for _, m in pairs])


@torch.no_grad()
def features_and_miou(seg, images: torch.Tensor, masks: torch.Tensor, num_classes: int, ignore: int):
    feats, cm = [], ConfusionMatrix(num_classes, ignore)
    for img, mask in zip(images, masks):
        x = to_tensors(img.numpy())[None]
        feats.append(seg.encode(x)[0])
        cm.update(predict_logits(seg, x, tuple(mask.shape)).argmax(1)[0], mask)
    return torch.stack(feats), cm.compute()["miou"]


def run(diffusion_dir: Path, segmenter_dir: Path, data: str, *, split: str = "val", num: int = 64,
        sampler: str = "ddim", steps: int = 25, guidance: float | None = None, seed: int = 0,
        inpaint_num: int = 8, batch_size: int = 16, device: str = "cpu", model_ref: str | None = None,
        segmenter_ref: str | None = None) -> dict:
    """Sample, score and return the figures with their protocol.  ``*_ref`` name the models in the
    protocol (default: their checkpoint directories)."""
    t0 = time.perf_counter()
    dck, model, weights = load_diffusion(diffusion_dir)
    sck, seg = load_segmenter(segmenter_dir)
    cfg = dck.config
    if cfg.cond == "mask" and cfg.num_classes != sck.config.num_classes:
        raise InputError("the diffusion model and the segmenter must share a label set "
                         f"({cfg.num_classes} vs {sck.config.num_classes} classes)")
    size = tuple(cfg.image_size)
    model.to(device)
    noise = make_train_scheduler(cfg)
    w = cfg.guidance if guidance is None else guidance
    real, masks = real_set(data, split, num, size)
    n = len(real)
    gen = torch.Generator().manual_seed(seed)
    fake = []
    t_sample = time.perf_counter()
    for s in range(0, n, batch_size):
        b = min(batch_size, n - s)
        cond = encode_labels(masks[s: s + b], cfg.num_classes, cfg.ignore_index) if cfg.cond == "mask" else None
        x = sample(model, noise, (b, 3, *size), cond=cond, w=w if cond is not None else 1.0, sampler=sampler,
                   steps=steps, generator=gen, device=device, progress=True)
        fake.append(to_uint8(x))
    sec_per_image = (time.perf_counter() - t_sample) / n
    fake = torch.cat(fake)

    k, ignore = sck.config.num_classes, sck.config.ignore_index
    f_real, miou_real = features_and_miou(seg, real, masks, k, ignore)
    f_fake, miou_fake = features_and_miou(seg, fake, masks, k, ignore)
    kid, kid_std = kernel_inception_distance(f_real, f_fake, subsets=10, subset_size=min(50, n), seed=seed)
    res = {
        "fd": frechet_distance(f_real, f_fake), "fd_std": frechet_distance_std(f_real, f_fake, seed=seed),
        "kid": kid, "kid_std": kid_std,
        "seconds_per_image": sec_per_image,
    }
    if cfg.cond == "mask":
        res["seg_miou_samples"] = miou_fake
        res["seg_miou_real_ceiling"] = miou_real

    if inpaint_num > 0:
        m = min(inpaint_num, n)
        holes = random_holes(m, size, 0.25, seed)
        x_known = from_uint8(real[:m])
        cond = encode_labels(masks[:m], cfg.num_classes, cfg.ignore_index) if cfg.cond == "mask" else None
        out = inpaint(model, noise, x_known, holes, cond=cond, w=w if cond is not None else 1.0, sampler=sampler,
                      steps=steps, generator=torch.Generator().manual_seed(seed), device=device)
        pred01, real01 = (to_uint8(out).permute(0, 3, 1, 2).float() / 255), real[:m].permute(0, 3, 1, 2).float() / 255
        res["inpaint_psnr"] = psnr_in_mask(pred01, real01, holes)
        res["inpaint_ssim"] = ssim_in_mask(pred01, real01, holes)
    res["protocol"] = {
        "samples": n, "size": list(size), "sampler": sampler, "steps": steps, "guidance": w, "seed": seed,
        "weights": weights, "data": str(Path(data).resolve()), "split": split,
        "features": "segmenter stride-32 features, global average pooled",
        "segmenter": segmenter_ref or str(segmenter_dir), "segmenter_epoch": sck.epoch,
        "diffusion": model_ref or str(diffusion_dir),
        "diffusion_epoch": dck.epoch, "inpaint_images": min(inpaint_num, n), "inpaint_hole": "one seeded box, 25%",
    }
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def format_report(res: dict) -> str:
    p = res["protocol"]
    lines = [f"protocol: {p['samples']} samples at {p['size'][0]}x{p['size'][1]}, {p['sampler']} x{p['steps']}, "
             f"w={p['guidance']}, {p['weights']} weights, seed {p['seed']}",
             f"diffusion model {p['diffusion']} (epoch {p['diffusion_epoch'] + 1})",
             f"segmenter {p['segmenter']} (epoch {p['segmenter_epoch'] + 1}); {p['features']}",
             f"FD   {res['fd']:.4f} +- {res['fd_std']:.4f} (bootstrap std)", f"KID  {res['kid']:.5f} +- {res['kid_std']:.5f}",
             f"sampling {res['seconds_per_image']:.3f} s/image"]
    if "seg_miou_samples" in res:
        lines.append(f"segmenter mIoU on samples {100 * res['seg_miou_samples']:.2f} "
                     f"(on real images, the ceiling: {100 * res['seg_miou_real_ceiling']:.2f})")
    if "inpaint_psnr" in res:
        lines.append(f"inpainting in the hole: PSNR {res['inpaint_psnr']:.2f} dB, SSIM {res['inpaint_ssim']:.4f}")
    return "\n".join(lines)
