"""DCGAN family: shapes, losses, penalties, a training step, checkpoints, the Generator interface,
and the collapse diagnostics."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genseg import checkpoint as ck
from genseg.config import ConfigError, GANConfig, gan_stages
from genseg.diffusion.ema import EMA
from genseg.gan.generator import GANGenerator, draw_z
from genseg.gan.losses import d_loss, g_loss, gradient_penalty, r1_penalty
from genseg.models.dcgan import build_discriminator, build_generator, label_condition
from genseg.gan.training import make_optimizers, train_step
from genseg.generation import Generator, SamplingError
from genseg.loading import WrongModelKind, load
from genseg.metrics import generation as gm

pytestmark = pytest.mark.unit


def cfg_for(size=(32, 48), **kw) -> GANConfig:
    return GANConfig(image_size=size, num_classes=5, g_channels=8, d_channels=8, z_dim=16, **kw)


@pytest.mark.parametrize("size", [(32, 32), (32, 48), (64, 80), (128, 128), (16, 24)])
@pytest.mark.parametrize("cond", ["mask", "none"])
def test_shapes_for_every_size(size, cond):
    cfg = cfg_for(size, cond=cond)
    g, d = build_generator(cfg), build_discriminator(cfg)
    seg = label_condition(torch.randint(0, 5, (3, *size)), cfg)
    assert (seg is None) == (cond == "none")
    x = g(torch.randn(3, 16), seg)
    assert x.shape == (3, 3, *size) and x.min() >= -1 and x.max() <= 1
    assert d(x, seg).shape == (3,)
    k, (h0, w0) = gan_stages(size)
    assert h0 * 2 ** k == size[0] and w0 * 2 ** k == size[1] and 4 <= min(h0, w0) < 8


def test_gan_stages_and_sizes_that_do_not_fit():
    assert gan_stages((32, 48)) == (3, (4, 6)) and gan_stages((64, 80)) == (4, (4, 5))
    with pytest.raises(ConfigError, match="image_size.*divisible by 64"):
        GANConfig(image_size=(360, 480))
    with pytest.raises(ConfigError, match="at least 8 pixels"):
        GANConfig(image_size=(4, 4))


def test_conditional_generator_follows_its_label_map():
    """The label map is injected: the same z with two different maps gives different images."""
    cfg = cfg_for()
    g = build_generator(cfg).eval()
    z = torch.randn(1, 16)
    a = g(z, label_condition(torch.zeros(1, 32, 48, dtype=torch.long), cfg))
    b = g(z, label_condition(torch.full((1, 32, 48), 3, dtype=torch.long), cfg))
    assert (a - b).abs().mean() > 0.1 * a.abs().mean()      # (DCGAN's N(0, 0.02) init keeps outputs small)


R, FK = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])


def sp(x):
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("name,d_expected,g_expected", [
    ("minimax", (sp(-2.0) + sp(1.0)) / 2 + (sp(0.5) + sp(-3.0)) / 2, -(sp(0.5) + sp(-3.0)) / 2),
    ("nsgan", (sp(-2.0) + sp(1.0)) / 2 + (sp(0.5) + sp(-3.0)) / 2, (sp(-0.5) + sp(3.0)) / 2),
    ("hinge", (0 + 2.0) / 2 + (1.5 + 0) / 2, -(0.5 - 3.0) / 2),
    ("wgan-gp", (0.5 - 3.0) / 2 - (2.0 - 1.0) / 2, -(0.5 - 3.0) / 2),
])
def test_each_loss_exact_on_constructed_logits(name, d_expected, g_expected):
    assert d_loss(name, R, FK).item() == pytest.approx(d_expected, rel=1e-6)
    assert g_loss(name, FK).item() == pytest.approx(g_expected, rel=1e-6)


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown GAN loss 'lsgan'"):
        d_loss("lsgan", R, FK)
    with pytest.raises(ConfigError, match="'loss' must be one of minimax, nsgan, hinge, wgan-gp"):
        GANConfig(loss="lsgan")


class Quadratic(torch.nn.Module):
    """D(x) = a/2 * ||x||^2 per sample, so grad_x D = a x: penalties by hand."""

    def __init__(self, a: float):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))

    def forward(self, x, seg=None):
        return 0.5 * self.a * x.flatten(1).pow(2).sum(1)


def test_gradient_penalty_equals_a_hand_computation():
    real, fake = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    d = Quadratic(1.5)
    gp = gradient_penalty(d, real, fake, generator=torch.Generator().manual_seed(7))
    eps = torch.rand(4, 1, 1, 1, generator=torch.Generator().manual_seed(7))
    x_hat = eps * real + (1 - eps) * fake
    expected = ((1.5 * x_hat.flatten(1).norm(dim=1) - 1) ** 2).mean()
    assert gp.item() == pytest.approx(expected.item(), rel=1e-5)
    gp.backward()                                   # the penalty trains D: d/da of the hand formula
    norms = x_hat.flatten(1).norm(dim=1)
    assert d.a.grad.item() == pytest.approx((2 * (1.5 * norms - 1) * norms).mean().item(), rel=1e-4)


def test_r1_penalty_equals_a_hand_computation():
    real = torch.randn(5, 3, 2, 2)
    d = Quadratic(0.7)
    assert r1_penalty(d, real).item() == pytest.approx((0.49 * real.flatten(1).pow(2).sum(1)).mean().item(), rel=1e-5)


@pytest.mark.parametrize("loss", ["minimax", "nsgan", "hinge", "wgan-gp"])
def test_a_few_steps_change_both_networks_and_keep_losses_finite(loss):
    torch.manual_seed(0)
    cfg = cfg_for(loss=loss, r1_weight=1.0 if loss == "hinge" else 0.0, d_steps=2 if loss == "wgan-gp" else 1)
    g, d = build_generator(cfg), build_discriminator(cfg)
    ema = EMA(g, 0.9)
    g0 = {k: v.clone() for k, v in g.state_dict().items()}
    d0 = {k: v.clone() for k, v in d.state_dict().items()}
    e0 = {k: v.clone() for k, v in ema.model.state_dict().items()}
    og, od = make_optimizers(g, d, cfg)
    x = torch.rand(6, 3, 32, 48) * 2 - 1
    seg = label_condition(torch.randint(0, 5, (6, 32, 48)), cfg)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        out = train_step(g, d, og, od, x, seg, cfg, gen, ema)
    assert all(math.isfinite(v) for v in out.values())
    assert {"d_loss", "g_loss", "d_real", "d_fake"} <= set(out)
    assert ("gp" in out) == (loss == "wgan-gp") and ("r1" in out) == (loss == "hinge")
    changed = lambda a, b: any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())  # noqa: E731
    assert changed(g0, g.state_dict()) and changed(d0, d.state_dict())
    assert changed(e0, ema.model.state_dict()) and ema.updates == 3
    # the EMA lags the generator: it is neither the start nor the current weights
    assert changed(g.state_dict(), ema.model.state_dict())


def test_discriminator_learns_to_separate_real_from_generated():
    """Hinge D on a fixed G: after some steps D(x) > D(G(z)) by a margin."""
    torch.manual_seed(1)
    cfg = cfg_for(cond="none", d_lr=2e-3)
    g, d = build_generator(cfg), build_discriminator(cfg)
    _, od = make_optimizers(g, d, cfg)
    og = torch.optim.SGD(g.parameters(), lr=0.0)             # the generator stands still
    real = torch.full((8, 3, 32, 48), 0.8)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        out = train_step(g, d, og, od, real, None, cfg, gen)
    assert out["d_real"] - out["d_fake"] > 1.0 and out["d_loss"] < 1.0


def _save_gan(tmp_path, cfg, g, d, ema, og, od, epoch=3):
    return ck.save(tmp_path / "gan", g, cfg, epoch=epoch, classes={"names": [f"c{i}" for i in range(5)],
                                                                   "palette": [[i * 40, 0, 0] for i in range(5)]},
                   optimizers={"generator": og, "discriminator": od}, extra_weights={"ema": ema.model, "discriminator": d},
                   extra_state={"ema_updates": ema.updates})


def test_checkpoint_round_trip_restores_both_optimizers_and_the_ema(tmp_path):
    torch.manual_seed(0)
    cfg = cfg_for(loss="wgan-gp")
    g, d = build_generator(cfg), build_discriminator(cfg)
    ema = EMA(g, 0.9)
    og, od = make_optimizers(g, d, cfg)
    x, seg = torch.rand(4, 3, 32, 48) * 2 - 1, label_condition(torch.randint(0, 5, (4, 32, 48)), cfg)
    for _ in range(2):
        train_step(g, d, og, od, x, seg, cfg, torch.Generator().manual_seed(0), ema)
    path = _save_gan(tmp_path, cfg, g, d, ema, og, od)

    g2, d2 = build_generator(cfg), build_discriminator(cfg)
    og2, od2 = make_optimizers(g2, d2, cfg)
    state = ck.load_train_state(path)
    og2.load_state_dict(state["optimizers"]["generator"])
    od2.load_state_dict(state["optimizers"]["discriminator"])
    d2.load_state_dict(ck.load_weights(path, "discriminator"))
    ema2 = ck.load_weights(path, "ema")
    for k, v in ema.model.state_dict().items():
        assert torch.equal(ema2[k], v)
    for a, b in ((og, og2), (od, od2)):
        sa, sb = a.state_dict()["state"], b.state_dict()["state"]
        assert sa.keys() == sb.keys() and len(sa) > 0
        assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert all(torch.equal(v, d2.state_dict()[k]) for k, v in d.state_dict().items())
    assert state["ema_updates"] == 2 and state["epoch"] == 3
    # a resumed step continues identically from both copies
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    g2.load_state_dict(ck.load(path).state_dict)
    a = train_step(g, d, og, od, x, seg, cfg, gen_a)
    b = train_step(g2, d2, og2, od2, x, seg, cfg, gen_b)
    assert a == pytest.approx(b, rel=1e-5)


def test_loaded_gan_is_a_generator_and_refuses_other_uses(tmp_path):
    cfg = cfg_for()
    g, d = build_generator(cfg), build_discriminator(cfg)
    ema = EMA(g, 0.9)
    path = _save_gan(tmp_path, cfg, g, d, ema, *make_optimizers(g, d, cfg))
    gan = load(path, expect="generator")
    assert isinstance(gan, GANGenerator) and isinstance(gan, Generator) and gan.weights == "ema"
    assert gan.kind == "gan" and gan.conditional and gan.image_size == (32, 48)
    with pytest.raises(WrongModelKind, match="is a gan model.*needs a segmenter"):
        load(path, expect="segmenter")
    labels = torch.randint(0, 5, (3, 64, 96))                        # any size: resized NEAREST
    a = gan.generate(labels, 3, seed=4)
    assert a.shape == (3, 32, 48, 3) and a.dtype == torch.uint8
    assert torch.equal(a, gan.generate(labels, 3, seed=4)) and not torch.equal(a, gan.generate(labels, 3, seed=5))
    with pytest.raises(SamplingError, match="has no unconditional mode"):
        gan.generate(None, 2, seed=0)
    with pytest.raises(SamplingError, match="--sampler, --steps: a GAN draws an image in one forward pass"):
        gan.settings(sampler="ddim", steps=20)
    with pytest.raises(SamplingError, match="truncation must be a finite number >= 0"):
        gan.settings(truncation=float("nan"))
    with pytest.raises(SamplingError, match="out of range"):
        gan.generate(torch.full((1, 32, 48), 9), 1, seed=0)


def test_truncation_bounds_the_latents():
    z = draw_z(500, 8, torch.Generator().manual_seed(0), truncation=0.5)
    assert z.abs().max() <= 0.5 and z.std() > 0.2           # redrawn inside, not clamped onto the edge
    assert draw_z(500, 8, torch.Generator().manual_seed(0)).abs().max() > 2


def test_inpainting_by_inversion_keeps_known_pixels_and_recovers_the_hole(tmp_path):
    torch.manual_seed(0)
    cfg = cfg_for(cond="none")
    g, d = build_generator(cfg), build_discriminator(cfg)
    # an untrained DCGAN in eval mode draws flat grey (BatchNorm's running stats are still 0/1 while
    # its features are tiny): give the output layer range and let BatchNorm see some batches
    with torch.no_grad():
        torch.nn.init.normal_(g.to_rgb.weight, 0, 0.3)
        for m in g.norms:
            m.momentum = None                  # cumulative running averages
        for _ in range(10):
            g(torch.randn(32, 16))
    ema = EMA(g, 0.0)
    gan = load(_save_gan(tmp_path, cfg, g, d, ema, *make_optimizers(g, d, cfg)), expect="generator")
    # a target the generator can make exactly: G(z*)
    target = gan.generate(None, 2, seed=11)
    holes = torch.zeros(2, 32, 48, dtype=torch.bool)
    holes[:, 8:24, 12:36] = True
    out = gan.inpaint(target, holes, None, seed=0)
    assert torch.equal(out[~holes], target[~holes])
    start = gan.generate(None, 2, seed=0)                    # the inversion's starting point
    err = lambda x: (x[holes].float() - target[holes].float()).abs().mean()  # noqa: E731
    assert target.float().std() > 50                          # a target with content, not flat grey
    assert err(out) < 0.2 * err(start)
    with pytest.raises(SamplingError, match="--resample"):
        gan.inpaint(target, holes, None, seed=0, resample=2)


def test_a_collapsed_generator_scores_clearly_worse_on_diversity():
    """The diagnostic must see collapse: a generator with constant output against real scenes."""
    from genseg.data.synthetic import make_scene

    def scenes(seed0, n):
        return torch.stack([torch.from_numpy(make_scene(0, seed0 + i, 32, 48)[0]).permute(2, 0, 1).float() / 127.5 - 1
                            for i in range(n)])

    feats = gm.RandomFeatures(seed=0)
    real, other = feats(scenes(0, 60)), feats(scenes(1000, 60))
    cfg = cfg_for(cond="none")
    g = build_generator(cfg).eval()
    with torch.no_grad():
        g.to_rgb.weight.zero_()
        g.to_rgb.bias.copy_(torch.tensor([0.2, -0.1, 0.4]))       # every sample the same flat image
        collapsed = feats(g(torch.randn(60, 16)))
    good, bad = gm.diversity(real, other), gm.diversity(real, collapsed)
    assert good["coverage"] > 0.5 and good["recall"] > 0.5
    assert bad["coverage"] < 0.1 and bad["recall"] < 0.1
    assert gm.frechet_distance(real, collapsed) > 3 * gm.frechet_distance(real, other)
