"""``genseg train gan``: a DCGAN-family model on Ray Train over the shared runner.

Both networks are DDP-wrapped (see genseg.gan.training for how the penalties stay correct under
DDP); the checkpoint holds the generator (``model``), its EMA (``ema``, used for sampling), the
discriminator and both optimizers, so a resumed run continues the same game.

The best checkpoint, and the champion, is the one with the lowest ``val_fd_rand``: the Frechet
distance between EMA-generator samples (on the first ``score_images`` val label maps, fixed z)
and those real val images, in the features of a fixed random conv net
(genseg.metrics.generation.RandomFeatures).  GAN losses say nothing about sample quality and
differ between objectives; a sample distance compares epochs, losses and runs on the same data.
Precision/recall/coverage in the same space are logged every epoch: a collapsing run shows
recall and coverage falling.
"""
from __future__ import annotations

import time

import numpy as np
import ray.train
import ray.train.torch
import torch

from genseg import engine
from genseg import rng as rng_lib
from genseg.config import GANConfig
from genseg.data.classes import colorize
from genseg.diffusion.data import diffusion_batch
from genseg.diffusion.ema import EMA
from genseg.diffusion.sampling import to_uint8
from genseg.gan.generator import draw_z
from genseg.models.dcgan import build_discriminator, build_generator, label_condition
from genseg.gan.training import make_optimizers, train_step
from genseg.metrics import generation as gm
from genseg.viz import stack_rows
from jobs import runner

STEP_FIGURES = ("d_loss", "g_loss", "d_real", "d_fake", "gp", "r1")


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    s = runner.WorkerSession(loop_config, GANConfig)
    cfg, rt = s.cfg, s.rt
    rng = engine.set_seed(cfg.seed, s.rank)
    gen = rng_lib.torch_generator(cfg.seed, s.rank, "noise")     # z and the penalty's interpolation weights
    rngs = {"augment": rng, "noise": gen}
    size = tuple(cfg.image_size)
    g = build_generator(cfg).to(s.device)
    d = build_discriminator(cfg).to(s.device)
    ema = EMA(g, cfg.ema_decay)
    opt_g, opt_d = make_optimizers(g, d, cfg)
    start_epoch, meta = s.restore({"model": g, "ema": ema.model, "discriminator": d},
                                  {"generator": opt_g, "discriminator": opt_d}, rngs=rngs)
    ema.updates = int(meta.get("extra_state", {}).get("ema_updates", 0))
    best = meta.get("best_val_fd_rand", float("inf"))
    g, d = ray.train.torch.prepare_model(g), ray.train.torch.prepare_model(d)
    ema.to(s.device)
    autocast = (lambda: engine.autocast(s.device, cfg.amp)) if s.device.type == "cuda" else None
    val_shard = ray.train.get_dataset_shard("val")
    scorer = Scorer(val_shard, cfg, s.device) if s.rank == 0 else None

    for epoch in range(start_epoch, cfg.epochs):
        t0, figures = time.perf_counter(), {k: [] for k in STEP_FIGURES}
        g.train()
        d.train()
        for batch in s.epoch_batches(epoch, cfg.batch_size):
            x, masks = diffusion_batch(batch, size, cfg.hflip, rng)
            seg = label_condition(masks, cfg)
            out = train_step(g, d, opt_g, opt_d, x.to(s.device), None if seg is None else seg.to(s.device),
                             cfg, gen, ema, autocast)
            for k, v in out.items():
                figures[k].append(v)
        seconds = time.perf_counter() - t0
        metrics = s.epoch_means(figures, seconds, cfg.batch_size)
        scores = scorer.score(ema.model) if scorer is not None else {}
        fd = s.broadcast(scores.get("val_fd_rand", float("nan")))
        best = min(best, fd) if np.isfinite(fd) else best
        metrics.update({"epoch": epoch, "val_fd_rand": fd, "best_val_fd_rand": best})
        if s.rank == 0:
            metrics.update({k: v for k, v in scores.items() if k != "val_fd_rand"})
            s.say(f"epoch {epoch + 1}/{cfg.epochs}: D loss {metrics['d_loss']:.4f}, G loss {metrics['g_loss']:.4f}, "
                  f"D(x) {metrics['d_real']:+.3f}, D(G(z)) {metrics['d_fake']:+.3f}"
                  + (f", GP {metrics['gp']:.4f}" if "gp" in metrics else "")
                  + f", val FD(rand) {fd:.4f}, recall {scores.get('rand_recall', float('nan')):.2f}, coverage "
                  f"{scores.get('rand_coverage', float('nan')):.2f} ({seconds:.1f}s, {metrics['samples_per_s']:.1f} img/s)")
            picture = None
            if epoch % cfg.sample_every == 0 or epoch == cfg.epochs - 1:
                picture = scorer.grid(ema.model, rt["classes"]["palette"])
            s.log(epoch, metrics, picture, f"samples/epoch_{epoch:03d}.png")
        s.report(epoch, metrics, {"model": g, "ema": ema.model, "discriminator": d},
                 {"generator": opt_g, "discriminator": opt_d}, meta={"best_val_fd_rand": best},
                 extra_state={"ema_updates": ema.updates}, rngs=rngs)


class Scorer:
    """The epoch score on rank 0: EMA-generator samples on fixed val label maps and fixed z, against
    those real val images, in a fixed random feature space (see the module docstring)."""

    def __init__(self, val_shard, cfg: GANConfig, device: torch.device, seed: int = 1234):
        # the first ``score_images`` val rows BY NAME: Ray Data's read order can differ between runs,
        # and a score on other images would not compare across runs
        names, xs, ms = [], [], []
        for batch in val_shard.iter_batches(batch_size=64, batch_format="numpy"):
            x, m = diffusion_batch(batch, tuple(cfg.image_size), False, None)
            names += [str(n) for n in batch["name"]]
            xs.append(x)
            ms.append(m)
        keep = torch.tensor(sorted(range(len(names)), key=names.__getitem__)[: cfg.score_images])
        self.real, self.masks = torch.cat(xs)[keep], torch.cat(ms)[keep]
        self.cfg, self.device = cfg, device
        self.features = gm.RandomFeatures(seed=0).to(device)
        self.z = draw_z(len(self.real), cfg.z_dim, torch.Generator().manual_seed(seed))
        self.f_real = self._feats(self.real)

    @torch.no_grad()
    def _feats(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.features(x[i: i + 64].to(self.device)).cpu() for i in range(0, len(x), 64)])

    @torch.no_grad()
    def _generate(self, model, z: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        model.eval()
        seg = label_condition(masks, self.cfg)
        out = [model(z[i: i + 64].to(self.device), None if seg is None else seg[i: i + 64].to(self.device)).float().cpu()
               for i in range(0, len(z), 64)]
        return torch.cat(out)

    def score(self, model) -> dict:
        fake = self._feats(self._generate(model, self.z, self.masks))
        out = {"val_fd_rand": gm.frechet_distance(self.f_real, fake)}
        if len(fake) > 5:
            div = gm.diversity(self.f_real, fake, k=5)
            out.update({f"rand_{k}": v for k, v in div.items() if k != "k"})
        return out

    def grid(self, model, palette, n: int = 4) -> np.ndarray:
        """Fixed z: rows of ``label map | sample`` (conditioned), else one row of samples."""
        k = min(n if self.cfg.cond == "mask" else 2 * n, len(self.z))
        imgs = to_uint8(self._generate(model, self.z[:k], self.masks[:k])).numpy()
        if self.cfg.cond == "mask":
            return stack_rows([np.concatenate([colorize(m.numpy(), palette), im], axis=1)
                               for m, im in zip(self.masks[:k], imgs)])
        return stack_rows([np.concatenate(list(imgs), axis=1)])


build_config = runner.fill_from_manifest

TASK = runner.Task(name="gan", experiment="genseg-gan", model_name="genseg-gan",
                   score="val_fd_rand", higher_is_better=False, loop=train_loop,
                   model_fields=("cond", "num_classes", "image_size", "z_dim", "g_channels", "d_channels",
                                 "max_channels", "spectral_norm"),
                   # FD is biased by n: scores on another number of val images do not compare
                   scored_on=lambda cfg: f"val (first {cfg.score_images} images)")


def run(data: str, cfg: GANConfig, rt, **kw) -> dict:
    """Train on the shards in ``data`` (see :func:`jobs.runner.run` for the keyword arguments)."""
    return runner.fit(TASK, data, cfg, rt, build_config, **kw)
