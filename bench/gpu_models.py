"""genseg's training steps and samplers on one device, in plain PyTorch (no Ray, no MLflow): the model
half of the GPU check, for a machine where Ray and MLflow cannot be installed.

    python bench/gpu_models.py --device cuda --json bench/results/gpu_models.json

For each of segmentation (FCN-8s, AMP bf16 and fp16 with a GradScaler), diffusion (the conditional
UNet, AMP fp16 with unscale -> clip -> step, and bf16; EMA on the device), the GAN (SPADE generator +
spectral-norm critic, WGAN-GP with its double backward under bf16) and the autoencoder (bf16), it
runs warm-up steps, then times steps on synthetic 64x64 scenes and checks the loss is finite and the
weights moved.  Then DDIM x20 sampling with guidance.  Prints images per second per path.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genseg import engine  # noqa: E402
from genseg.config import DiffusionConfig, GANConfig, SegConfig, VAEConfig  # noqa: E402
from genseg.data.synthetic import make_scene  # noqa: E402


def scenes(n: int, h: int, w: int):
    pairs = [make_scene(0, i, h, w) for i in range(n)]
    images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).float() / 127.5 - 1
    masks = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
    return images, masks


def timed(step, sync, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - t0


def moved(before: dict, model) -> bool:
    return any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if v.dtype.is_floating_point)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="64x64")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    h, w = (int(v) for v in args.size.split("x"))
    b, k = args.batch, 7
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    images, masks = scenes(b, h, w)
    images, masks = images.to(device), masks.to(device)
    amps = ("bf16", "fp16") if device.type == "cuda" else ("none",)
    rows = []

    def record(name, seconds, ok, extra=None):
        rows.append({"path": name, "img_per_s": round(args.steps * b / seconds, 1), "finite_and_moved": ok,
                     **(extra or {})})
        print(f"{name:44}{args.steps * b / seconds:>10.1f} img/s   {'ok' if ok else 'FAILED'}", flush=True)

    # segmentation
    from genseg.losses import get_loss
    from genseg.models import build_segmenter

    for amp in amps:
        cfg = SegConfig(num_classes=k, width=32, amp=amp)
        torch.manual_seed(0)
        net = build_segmenter(cfg).to(device)
        opt = engine.make_optimizer(net, cfg)
        scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        before = {k_: v.clone() for k_, v in net.state_dict().items()}
        x = (images + 1) / 2 / 0.25 - 2
        stats = {}

        def seg_step():
            stats.update(engine.train_one_epoch(net, opt, None, [(x, masks)], cfg, device, scaler))

        sec = timed(seg_step, sync, 3, args.steps)
        record(f"seg fcn8s compact, amp {amp}", sec, np.isfinite(stats["train_loss"]) and moved(before, net))
        cm, _ = engine.evaluate(net, [(x[i], masks[i]) for i in range(8)], k, 255, 1.0, device, amp)
        assert cm.mat.sum() == 8 * h * w

    # diffusion
    from genseg.diffusion.conditioning import encode_labels
    from genseg.diffusion.ema import EMA
    from genseg.diffusion.schedules import make_train_scheduler
    from genseg.diffusion.training import train_step as diffusion_step
    from genseg.models.unet import build_diffusion_model

    dcfg = None
    for amp in amps:
        dcfg = DiffusionConfig(num_classes=k, channels=(32, 64, 128), image_size=(h, w), amp="none" if amp == "none" else amp)
        torch.manual_seed(0)
        net = build_diffusion_model(dcfg).to(device)
        ema = EMA(net, 0.999)
        opt = torch.optim.AdamW(net.parameters(), lr=2e-4)
        scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        noise = make_train_scheduler(dcfg)
        cond = encode_labels(masks.cpu(), k, 255).to(device)
        gen = torch.Generator().manual_seed(0)
        autocast = (lambda a=amp: engine.autocast(device, a)) if device.type == "cuda" else None
        before = {k_: v.clone() for k_, v in net.state_dict().items()}
        losses = []
        sec = timed(lambda: losses.append(diffusion_step(net, opt, images, cond, noise, 0.1, ema, autocast, gen, scaler)),
                    sync, 3, args.steps)
        ema_moved = any(not torch.equal(a, c) for a, c in zip(ema.model.state_dict().values(), before.values())
                        if a.dtype.is_floating_point)
        record(f"diffusion UNet 32/64/128, amp {amp}", sec, bool(np.isfinite(losses).all()) and moved(before, net)
               and ema_moved)
        dnet = net

    from genseg.diffusion.generator import DiffusionGenerator

    classes = {"names": [f"c{i}" for i in range(k)], "palette": [[i * 30, 100, 200 - i * 20] for i in range(k)]}
    g = DiffusionGenerator(dnet, dcfg, classes, device=device)
    sync()
    t0 = time.perf_counter()
    n = min(16, b)
    out = g.generate(masks[:n].cpu(), n, seed=0, sampler="ddim", steps=20, guidance=2.0)
    sync()
    sec = time.perf_counter() - t0
    ok = out.shape[0] == n and bool(torch.isfinite(out.float()).all())
    rows.append({"path": f"DDIM x20, guidance 2 ({n} images)", "seconds_per_image": round(sec / n, 4),
                 "finite_and_moved": ok})
    print(f"{f'DDIM x20, guidance 2 ({n} images)':44}{sec / n * 1000:>10.1f} ms/image  {'ok' if ok else 'FAILED'}",
          flush=True)

    # GAN, WGAN-GP
    from genseg.gan.training import make_optimizers, train_step as gan_step
    from genseg.models.dcgan import build_discriminator, build_generator

    for amp in amps[:1]:
        gcfg = GANConfig(num_classes=k, image_size=(h, w), loss="wgan-gp", d_steps=2, amp=amp if amp != "fp16" else "bf16")
        torch.manual_seed(0)
        gnet, dnet_ = build_generator(gcfg).to(device), build_discriminator(gcfg).to(device)
        opt_g, opt_d = make_optimizers(gnet, dnet_, gcfg)
        ema = EMA(gnet, 0.999)
        seg = encode_labels(masks.cpu(), k, 255).to(device)
        gen = torch.Generator().manual_seed(0)
        autocast = (lambda a=gcfg.amp: engine.autocast(device, a)) if device.type == "cuda" else None
        before = {k_: v.clone() for k_, v in gnet.state_dict().items()}
        figs = []
        sec = timed(lambda: figs.append(gan_step(gnet, dnet_, opt_g, opt_d, images, seg, gcfg, gen, ema, autocast)),
                    sync, 3, args.steps)
        ok = all(np.isfinite(v) for f in figs for v in f.values()) and moved(before, gnet) and "gp" in figs[-1]
        record(f"GAN wgan-gp (2 critic steps), amp {gcfg.amp}", sec, ok)

    # autoencoder
    from genseg.models.vae import build_vae
    from genseg.vae.training import train_step as vae_step

    vcfg = VAEConfig(channels=(32, 64, 128, 128), norm_groups=16, latent_channels=4, image_size=(h, w),
                     amp="bf16" if device.type == "cuda" else "none")
    torch.manual_seed(0)
    vae = build_vae(vcfg).to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    ema = EMA(vae, 0.999)
    gen = torch.Generator().manual_seed(0)
    autocast = (lambda: engine.autocast(device, vcfg.amp)) if device.type == "cuda" else None
    before = {k_: v.clone() for k_, v in vae.state_dict().items()}
    figs = []
    sec = timed(lambda: figs.append(vae_step(vae, opt, images, vcfg, gen, ema, None, None, autocast)), sync, 3, args.steps)
    record(f"VAE f8, amp {vcfg.amp}", sec, all(np.isfinite(f["loss"]) for f in figs) and moved(before, vae))

    meta = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "size": [h, w], "batch": b, "steps": args.steps, "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(meta, indent=1))
    bad = [r["path"] for r in rows if r.get("finite_and_moved") is False]
    if bad:
        print(f"FAILED: {bad}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
