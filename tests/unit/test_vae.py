"""The latent-diffusion autoencoder: shapes for each factor, the KL on constructed moments, the loss
terms, training steps (with and without the discriminator), checkpoints and the loaded Autoencoder."""
import math

import numpy as np
import pytest
import torch

from genseg import checkpoint as ck
from genseg.config import ConfigError, VAEConfig
from genseg.diffusion.ema import EMA
from genseg.errors import InputError
from genseg.loading import WrongModelKind, load
from genseg.models.vae import PatchDiscriminator, build_vae
from genseg.vae.training import kl_divergence, psnr, reconstruction_terms, train_step, vae_loss

pytestmark = pytest.mark.unit

CLASSES = {"names": ["a", "b"], "palette": [[0, 0, 0], [255, 255, 255]]}


def tiny(**kw) -> VAEConfig:
    base = dict(channels=(8, 16), norm_groups=4, latent_channels=3, image_size=(16, 24))
    base.update(kw)
    return VAEConfig(**base)


@pytest.mark.parametrize("channels,factor", [((8, 16), 2), ((8, 16, 16), 4), ((8, 8, 16, 16), 8)])
def test_shapes_for_each_factor(channels, factor):
    cfg = tiny(channels=channels, image_size=(32, 48))
    assert cfg.factor == factor
    net = build_vae(cfg)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    mean, logvar = net.moments(x)
    assert mean.shape == logvar.shape == (2, 3, 32 // factor, 48 // factor)
    rec, m2, _ = net(x, torch.randn(mean.shape))
    assert rec.shape == x.shape and torch.equal(m2, mean)
    assert net.decode(mean).shape == x.shape


def test_kl_is_exact_on_constructed_moments():
    mean = torch.zeros(2, 3, 4, 5)
    logvar = torch.zeros(2, 3, 4, 5)
    assert torch.allclose(kl_divergence(mean, logvar), torch.zeros(2))          # the prior itself
    mean[0] = 1.0                                                               # mean 1, var 1: 0.5 per value
    logvar[1] = math.log(2.0)                                                   # mean 0, var 2: 0.5 (1 - ln 2)
    kl = kl_divergence(mean, logvar)
    n = 3 * 4 * 5
    assert kl[0].item() == pytest.approx(0.5 * n, rel=1e-6)
    assert kl[1].item() == pytest.approx(0.5 * (1 - math.log(2.0)) * n, rel=1e-6)


def test_loss_terms_and_the_kl_normalisation():
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    same = reconstruction_terms(x, x)
    assert same["l1"].item() == 0 and same["ssim_loss"].item() == pytest.approx(0, abs=1e-6)
    off = reconstruction_terms(x + 0.1, x)
    assert off["l1"].item() == pytest.approx(0.1, rel=1e-5) and off["ssim_loss"].item() > 0
    mean, logvar = torch.ones(2, 3, 8, 12), torch.zeros(2, 3, 8, 12)
    cfg = tiny(l1_weight=0.0, ssim_weight=1.0, kl_weight=2.0)
    loss, figures = vae_loss(x, x, mean, logvar, cfg)
    # KL summed over latent values (0.5 each) and divided by the pixel values, weighted 2
    assert figures["kl"] == pytest.approx(0.5 * 3 * 8 * 12 / (3 * 16 * 24), rel=1e-6)
    assert loss.item() == pytest.approx(2.0 * figures["kl"], abs=1e-5)
    inner = x / 2                                  # in [-0.5, 0.5]: psnr clamps to [-1, 1] first
    assert psnr(inner, inner).min() > 100
    assert psnr(inner + 0.2, inner)[0].item() == pytest.approx(10 * math.log10(4 / 0.04), rel=1e-4)
    ones = torch.ones(1, 3, 4, 4)
    assert psnr(1.7 * ones, ones).item() > 100          # out of range: clamped back


def _data(n=8, size=(16, 24), seed=0):
    """Smooth images (blocks of colour): something an autoencoder can learn in a few steps."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, size[0] // 8, size[1] // 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(small, size=size, mode="nearest")


@pytest.mark.parametrize("adversarial", [False, True])
def test_a_few_steps_lower_the_reconstruction_loss(adversarial):
    torch.manual_seed(0)
    cfg = tiny(lr=3e-3, disc_weight=0.01 if adversarial else 0.0)
    net = build_vae(cfg)
    ema = EMA(net, 0.9)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    disc = PatchDiscriminator(8) if adversarial else None
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3) if adversarial else None
    d_before = [p.detach().clone() for p in disc.parameters()] if adversarial else []
    ema_before = ema.model.state_dict()["vae.decoder.conv_out.weight"].clone()
    x, gen = _data(), torch.Generator().manual_seed(0)
    with torch.no_grad():
        first = reconstruction_terms(net.decode(net.moments(x)[0]), x)["l1"].item()
    figures = [train_step(net, opt, x, cfg, gen, ema, disc, opt_d) for _ in range(40)]
    with torch.no_grad():
        last = reconstruction_terms(net.decode(net.moments(x)[0]), x)["l1"].item()
    assert last < 0.7 * first, (first, last)
    assert figures[-1]["loss"] < figures[0]["loss"]
    assert ema.updates == 40
    # the EMA moved towards the trained weights (an update that did nothing would leave it where it began)
    ema_after = ema.model.state_dict()["vae.decoder.conv_out.weight"]
    trained = net.state_dict()["vae.decoder.conv_out.weight"]
    assert not torch.equal(ema_after, ema_before)
    assert (ema_after - trained).norm() < (ema_before - trained).norm()
    if adversarial:
        assert {"g_adv", "d_loss"} <= set(figures[-1])
        assert any(not torch.equal(a, b) for a, b in zip(d_before, disc.parameters()))
    else:
        assert "d_loss" not in figures[-1]


def test_discriminator_scores_patches():
    d = PatchDiscriminator(8)
    assert d(torch.zeros(2, 3, 32, 48)).shape == (2, 1, 8, 12)


def test_config_checks_sizes_against_the_factor():
    with pytest.raises(ConfigError, match="multiple of the VAE factor 4"):
        VAEConfig(channels=(8, 16, 16), norm_groups=4, image_size=(30, 48))
    with pytest.raises(ConfigError, match="norm_groups"):
        VAEConfig(channels=(8, 12), norm_groups=8)
    with pytest.raises(ConfigError, match="larger than image_size"):
        tiny(crop=(32, 24))
    with pytest.raises(ConfigError, match="cannot both be 0"):
        tiny(l1_weight=0.0, ssim_weight=0.0)


def test_checkpoint_round_trip_and_the_loaded_autoencoder(tmp_path):
    torch.manual_seed(0)
    cfg = tiny()
    net = build_vae(cfg)
    ema = EMA(net, 0.5)
    with torch.no_grad():
        for p in ema.model.parameters():
            p.add_(0.01)                           # EMA weights that differ from the model's
    path = ck.save(tmp_path / "vae", net, cfg, epoch=3, classes=CLASSES, extra_meta={"latent_scale": 2.0},
                   extra_weights={"ema": ema.model})
    vae = load(path, expect="vae")
    assert vae.kind == "vae" and vae.factor == 2 and vae.latent_channels == 3 and vae.weights == "ema"
    assert vae.scale == 2.0 and vae.epoch == 3
    x = _data(2)
    z = vae.encode(x)
    assert z.shape == (2, 3, 8, 12)
    assert torch.allclose(z, ema.model.moments(x)[0] * 2.0, atol=1e-6)     # EMA weights, scaled
    assert torch.allclose(vae.decode(z), ema.model.decode(z / 2.0).clamp(-1, 1), atol=1e-6)
    images = vae.decode_images(z)
    assert images.shape == (2, 16, 24, 3) and images.dtype == np.uint8
    assert load(path, expect="vae", weights="model").weights == "model"
    with pytest.raises(InputError, match="not a multiple of the autoencoder's factor 2"):
        vae.encode(torch.zeros(1, 3, 15, 24))
    with pytest.raises(InputError, match="latents have 4 channels"):
        vae.decode(torch.zeros(1, 4, 8, 12))
    with pytest.raises(WrongModelKind, match="is a vae model"):
        load(path, expect="generator")
