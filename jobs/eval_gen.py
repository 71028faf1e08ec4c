"""``genseg eval gen``: generation quality in the project's own segmenter feature space.

Real images are the first ``num`` of a shard split, resized to the generator's size.  Generated
images are drawn through the generation interface on the same label maps (label-conditioned
models) or unconditionally.  Reported, each with its n:

* FD and KID on the segmenter's pooled stride-32 features, FD with a bootstrap std, and the
  real-vs-real noise floor at the same n (two disjoint real sets when the split holds 2n images,
  else two halves of the real set, at n/2, which overstates the floor at n);
* the segmenter's mIoU on conditioned samples, with its mIoU on the real images at the same size as
  the ceiling (the protocol names the segmenter's training size; a ceiling from a segmenter that
  never saw this resolution is flagged);
* PSNR/SSIM inside seeded rectangular holes for inpainting (SSIM over windows inside the hole).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from genseg.diffusion.data import diffusion_batch
from genseg.diffusion.sampling import to_uint8
from genseg.errors import InputError
from genseg.metrics import ConfusionMatrix
from genseg.metrics import generation as gm
from pipelines.shards import iter_split


DIVERSITY_K = 5          # k of the k-NN balls of precision / recall / density / coverage


def real_set(data: str, split: str, num: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> images ``(N, H, W, 3) uint8`` and masks ``(N, H, W)`` at the model size."""
    pairs = [diffusion_batch(batch, size, False, None) for batch in iter_split(data, split, limit=num)]
    if sum(len(x) for x, _ in pairs) < 2:
        raise InputError(f"{data} [{split}] has fewer than 2 images to evaluate against")
    return to_uint8(torch.cat([x for x, _ in pairs])), torch.cat([m for _, m in pairs])


@torch.no_grad()
def features_and_miou(seg, images: torch.Tensor, masks: torch.Tensor, with_histogram: bool = False):
    """Segmenter features ``(N, D)`` and its mIoU of ``images`` against ``masks`` (and, with
    ``with_histogram``, the share of pixels it assigns to each class)."""
    cm = ConfusionMatrix(seg.num_classes, seg.ignore_index)
    feats, preds = [], []
    for i in range(0, len(images), 16):
        batch = images[i: i + 16]
        feats.append(seg.features(batch))
        pred = torch.from_numpy(seg.segment_batch(batch.numpy()))
        preds.append(pred)
        cm.update(pred, masks[i: i + 16])
    if with_histogram:
        return torch.cat(feats), cm.compute()["miou"], gm.class_histogram(torch.cat(preds), seg.num_classes)
    return torch.cat(feats), cm.compute()["miou"]


def compare(f_real: torch.Tensor, f_fake: torch.Tensor, miou_real: float, miou_fake: float | None,
            seed: int) -> dict:
    """The figures of a generated set against the real one, from their segmenter features (and, for
    label-conditioned samples, ``miou_fake``, the segmenter's mIoU on them against their label maps,
    with ``miou_real`` on the real images as the ceiling).  ``eval gen`` and every tuning trial
    report these, computed here only."""
    kid, kid_std = gm.kernel_inception_distance(f_real, f_fake, seed=seed)
    out = {"fd": gm.frechet_distance(f_real, f_fake), "fd_std": gm.frechet_distance_std(f_real, f_fake, seed=seed),
           "kid": kid, "kid_std": kid_std}
    if miou_fake is not None:
        out["seg_miou_samples"] = miou_fake
        out["seg_miou_real_ceiling"] = miou_real
        out["seg_miou_fraction_of_ceiling"] = miou_fake / miou_real if miou_real > 0 else None
    return out


def noise_floor(seg, other: torch.Tensor, feats_real: torch.Tensor, seed: int) -> dict | None:
    """FD/KID between two real sets: the evaluation set against the next ``n`` images of the split
    when it holds ``2n`` (the floor at n, std by bootstrap), else random disjoint halves of the
    evaluation set (n/2 each, mean and std over 10 splits; a floor at n/2 is higher than at n).
    None when there are too few images for two sets of at least 2."""
    n = len(feats_real)
    if len(other) >= n:      # ``other``: the real images after the evaluation set (read with it, once)
        f_other = torch.cat([seg.features(other[i: i + 16]) for i in range(0, n, 16)])
        return {"fd": gm.frechet_distance(feats_real, f_other),
                "fd_std": gm.frechet_distance_std(feats_real, f_other, seed=seed),
                "kid": gm.kernel_inception_distance(feats_real, f_other, seed=seed)[0],
                "diversity": gm.diversity(feats_real, f_other) if n > DIVERSITY_K else None,
                "n": n, "method": f"the evaluation set against the next {n} real images"}
    if n < 4:
        return None
    fd, fd_std = gm.fd_noise_floor(feats_real, seed=seed)
    kid, _ = gm.kid_noise_floor(feats_real, seed=seed)
    return {"fd": fd, "fd_std": fd_std, "kid": kid, "n": n // 2,
            "method": f"random halves of the real set ({n // 2} each, 10 splits; the split has < {2 * n} images)"}


def run(gen, seg, data: str, *, split: str = "val", num: int = 64, seed: int = 0, inpaint_num: int = 8,
        batch_size: int = 16, model_ref: str | None = None, segmenter_ref: str | None = None,
        keep_features: bool = False, **sampling) -> dict:
    """Sample through ``gen`` (a :class:`genseg.generation.Generator`), score with ``seg`` (a
    :class:`genseg.segmenter.Segmenter`) and return the figures with their protocol.
    ``keep_features`` adds ``res["features"] = {"real": (n, D), "fake": (n, D)}`` (tensors, not
    JSON; row i of both belongs to the same label map) for paired comparisons across runs."""
    t0 = time.perf_counter()
    settings = gen.settings(**sampling)
    if gen.conditional and gen.num_classes != seg.num_classes:
        raise InputError("the generative model and the segmenter must share a label set "
                         f"({gen.num_classes} vs {seg.num_classes} classes)")
    size = tuple(gen.image_size)
    both, both_masks = real_set(data, split, 2 * num, size)      # the eval set, then the floor's
    real, masks = both[:num], both_masks[:num]
    n = len(real)
    cond = masks if gen.conditional else None
    t_sample = time.perf_counter()
    fake = gen.generate(cond, n, seed, batch_size=batch_size, progress=True, **settings.to_dict())
    sec_per_image = (time.perf_counter() - t_sample) / n

    f_real, miou_real, hist_real = features_and_miou(seg, real, masks, with_histogram=True)
    f_fake, miou_fake, hist_fake = features_and_miou(seg, fake, masks, with_histogram=True)
    res = {
        "n": n,
        **compare(f_real, f_fake, miou_real, miou_fake if gen.conditional else None, seed),
        "noise_floor": noise_floor(seg, both[n:], f_real, seed),
        "seconds_per_image": sec_per_image,
        # collapse diagnostics: diversity in the segmenter's feature space, and the class-pixel
        # histogram of the samples as the segmenter sees them against that of the real images
        "diversity": gm.diversity(f_real, f_fake, k=DIVERSITY_K) if n > DIVERSITY_K else None,
        "class_histogram": {"names": list(seg.names), "samples": hist_fake.tolist(), "real": hist_real.tolist(),
                            "tv_distance": gm.histogram_distance(hist_fake, hist_real)},
    }

    if inpaint_num > 0:
        m = min(inpaint_num, n)
        holes = gm.random_holes(m, size, 0.25, seed)
        out = gen.inpaint(real[:m], holes[:, 0] > 0, masks[:m] if gen.conditional else None, seed,
                          **settings.to_dict())
        pred01, real01 = out.permute(0, 3, 1, 2).float() / 255, real[:m].permute(0, 3, 1, 2).float() / 255
        res["inpaint_psnr"] = gm.psnr_in_mask(pred01, real01, holes)
        res["inpaint_ssim"] = gm.ssim_in_mask(pred01, real01, holes)
        # the seam: colour steps across the hole's border against those inside it, with the real
        # images' figure over the same holes beside it (about 1 when the hole cuts no edge)
        res["inpaint_boundary"] = gm.boundary_contrast(pred01, holes > 0)["ratio"]
        res["inpaint_boundary_real"] = gm.boundary_contrast(real01, holes > 0)["ratio"]
    train_size = (seg.meta or {}).get("train_size") if hasattr(seg, "meta") else None
    res["protocol"] = {
        "samples": n, "size": list(size), **settings.to_dict(), "sampling": settings.describe(), "seed": seed,
        "weights": getattr(gen, "weights", None), "data": str(Path(data).resolve()), "split": split,
        "features": "segmenter stride-32 features, global average pooled",
        "segmenter": segmenter_ref or str(getattr(seg, "path", "?")), "segmenter_epoch": getattr(seg, "epoch", -1),
        "segmenter_train_size": train_size,
        "segmenter_matches_resolution": None if train_size is None else list(train_size) == list(size),
        "generator": model_ref or str(getattr(gen, "path", "?")), "generator_kind": gen.kind,
        "generator_epoch": getattr(gen, "epoch", -1),
        "inpaint_images": min(inpaint_num, n), "inpaint_hole": "one seeded box, 25%",
    }
    res["seconds"] = round(time.perf_counter() - t0, 2)
    if keep_features:
        res["features"] = {"real": f_real, "fake": f_fake}
    return res


def _pm(v, std, fmt: str) -> str:
    return f"{v:{fmt}}" + ("" if std is None else f" +- {std:{fmt}}")


def format_report(res: dict) -> str:
    p, fl = res["protocol"], res["noise_floor"] or {"fd": float("nan"), "fd_std": None,
                                                    "method": "none: too few real images"}
    lines = [f"protocol: n={p['samples']} samples at {p['size'][0]}x{p['size'][1]}, {p['sampling']}, "
             f"{p['weights']} weights, seed {p['seed']}",
             f"generator {p['generator']} ({p['generator_kind']}, epoch {p['generator_epoch'] + 1})",
             f"segmenter {p['segmenter']} (epoch {p['segmenter_epoch'] + 1}); {p['features']}",
             f"FD   {_pm(res['fd'], res['fd_std'], '.4f')} (bootstrap std); real-vs-real floor "
             f"{_pm(fl['fd'], fl['fd_std'], '.4f')} ({fl['method']})",
             f"KID  {_pm(res['kid'], res['kid_std'], '.5f')}"
             + ("" if fl.get("kid") is None else f"; real-vs-real floor {fl['kid']:.5f}"),
             f"sampling {res['seconds_per_image']:.3f} s/image"]
    if res["noise_floor"] is None:
        lines.append("note: no real-vs-real noise floor at this n, so the FD cannot be judged")
    elif not gm.fd_difference_resolved(res["fd"], res["fd_std"], fl["fd"], fl["fd_std"]):
        lines.append("note: FD is within the noise of the real-vs-real floor at this n: samples and real images "
                     "are not distinguishable by FD here")
    div, fdiv = res.get("diversity"), (fl.get("diversity") if res["noise_floor"] else None)
    if div:
        lines.append("diversity (k=5 NN balls in the segmenter's features): "
                     + ", ".join(f"{k} {div[k]:.3f}" + ("" if not fdiv else f" (real-vs-real {fdiv[k]:.3f})")
                                 for k in ("precision", "recall", "density", "coverage")))
    hist = res.get("class_histogram")
    if hist:
        top = sorted(range(len(hist["names"])), key=lambda i: -hist["real"][i])[:4]
        lines.append(f"class pixels as segmented, samples vs real: TV distance {hist['tv_distance']:.3f} ("
                     + ", ".join(f"{hist['names'][i]} {100 * hist['samples'][i]:.0f}/{100 * hist['real'][i]:.0f} %"
                                 for i in top) + ")")
    if "seg_miou_samples" in res:
        frac = res.get("seg_miou_fraction_of_ceiling")
        lines.append(f"segmenter mIoU on samples {100 * res['seg_miou_samples']:.2f} vs {100 * res['seg_miou_real_ceiling']:.2f} "
                     f"on the real images (the ceiling)" + ("" if frac is None else f": {100 * frac:.0f} % of it")
                     + f", n={p['samples']}")
        if p.get("segmenter_matches_resolution") is False:
            lines.append(f"warning: the segmenter was trained at {p['segmenter_train_size']}, not at the samples' "
                         f"{p['size']}: its ceiling and features are not the protocol's")
    if "inpaint_psnr" in res:
        ssim = res["inpaint_ssim"]
        lines.append(f"inpainting in the hole (n={p['inpaint_images']}): PSNR {res['inpaint_psnr']:.2f} dB, SSIM "
                     + ("n/a (hole smaller than the SSIM window)" if ssim is None else f"{ssim:.4f}")
                     + f", seam contrast {res['inpaint_boundary']:.2f} (real images over the same holes: "
                       f"{res['inpaint_boundary_real']:.2f})")
    return "\n".join(lines)
