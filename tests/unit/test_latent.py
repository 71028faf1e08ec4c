"""Latent diffusion's parts: label maps pooled to the latent grid, latent shard rows, latent batches,
the latent generator (full-resolution samples, inpainting in latent space), and checkpoints that carry
their autoencoder."""
import dataclasses

import numpy as np
import pytest
import torch

from genseg import checkpoint as ck
from genseg import config as config_lib
from genseg.config import ConfigError, DiffusionConfig, VAEConfig
from genseg.data.shards import DecodeError, decode_batch, decode_row, encode_latent_row
from genseg.diffusion.conditioning import pool_labels
from genseg.diffusion.data import diffusion_batch
from genseg.diffusion.generator import DiffusionGenerator
from genseg.diffusion.schedules import make_train_scheduler
from genseg.loading import load
from genseg.models.unet import build_diffusion_model
from genseg.models.vae import build_vae
from genseg.vae.autoencoder import Autoencoder

pytestmark = pytest.mark.unit

CLASSES = {"names": ["a", "b", "c"], "palette": [[0, 0, 0], [255, 0, 0], [0, 255, 0]]}


def test_pool_labels_takes_the_majority_of_each_cell():
    m = torch.tensor([[[0, 0, 1, 1],
                       [0, 2, 1, 255],
                       [255, 255, 2, 1],
                       [255, 255, 1, 2]]])
    # cells: {0,0,0,2} -> 0; {1,1,1,ignore} -> 1; all ignored -> ignore; {2,1,1,2} tie -> the lower id 1
    assert pool_labels(m, 2, 3).tolist() == [[[0, 1], [255, 1]]]
    assert torch.equal(pool_labels(m, 1, 3), m)
    with pytest.raises(ValueError, match="do not pool"):
        pool_labels(m[:, :3], 2, 3)


def test_latent_rows_round_trip_and_damage_is_one_line():
    z = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    mask = np.arange(15, dtype=np.uint8).reshape(3, 5) % 3
    row = encode_latent_row("x", z, mask)
    back, m = decode_row(row)
    assert back.shape == (4, 3, 5) and back.dtype == np.float32
    assert np.allclose(back, z, atol=2e-3) and np.array_equal(m, mask)          # float16 storage
    with pytest.raises(DecodeError, match="row 'x'.*do not fit a 3x5 grid"):
        decode_row({**row, "image": row["image"][:-3]})


def test_latent_batches_are_not_resized_and_flip_with_their_labels():
    rows = [encode_latent_row(f"r{i}", np.full((3, 2, 4), i, np.float32) + np.arange(4, dtype=np.float32),
                              np.tile(np.arange(4, dtype=np.uint8), (2, 1))) for i in range(2)]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    x, m = diffusion_batch(batch, (2, 4), False, None)
    assert x.shape == (2, 3, 2, 4) and x[1, 0, 0].tolist() == [1, 2, 3, 4] and m.shape == (2, 2, 4)

    class Always:                    # an rng whose every draw flips
        def random(self):
            return 0.0

    xf, mf = diffusion_batch(batch, (2, 4), True, Always())
    assert torch.equal(xf, x.flip(-1)) and torch.equal(mf, m.flip(-1))
    with pytest.raises(ValueError, match="cannot be resized"):
        diffusion_batch(batch, (4, 8), False, None)
    assert len(decode_batch(batch)) == 2


def _latent_model(seed=0):
    torch.manual_seed(seed)
    vcfg = VAEConfig(channels=(8, 16, 16), norm_groups=4, latent_channels=3, image_size=(16, 24))
    vae = Autoencoder(build_vae(vcfg), vcfg, 1.3)
    dcfg = DiffusionConfig(num_classes=3, channels=(8, 16), image_size=(4, 6), timesteps=20, sample_steps=2,
                           latent_channels=3, latent_factor=4)
    return build_diffusion_model(dcfg), dcfg, vae, vcfg


def test_a_latent_generator_samples_at_full_resolution_and_pools_its_condition():
    net, dcfg, vae, _ = _latent_model()
    gen = DiffusionGenerator(net, dcfg, CLASSES, decoder=vae)
    assert gen.image_size == (16, 24) and gen.grid == (4, 6)
    labels = torch.zeros(2, 16, 24, dtype=torch.long)
    labels[:, :, 12:] = 2
    out = gen.generate(labels, 2, seed=3)
    assert out.shape == (2, 16, 24, 3) and out.dtype == torch.uint8
    assert torch.equal(out, gen.generate(labels, 2, seed=3))                    # seeded
    cond, real = gen._cond(labels, 2)
    assert real and cond.shape == (2, 4, 4, 6)                                  # K + 1 channels on the grid
    assert cond[0, 0, :, :3].eq(1).all() and cond[0, 2, :, 3:].eq(1).all()
    with pytest.raises(ValueError, match="needs its autoencoder"):
        DiffusionGenerator(net, dcfg, CLASSES)


def test_latent_inpainting_keeps_every_pixel_outside_the_holes():
    net, dcfg, vae, _ = _latent_model()
    gen = DiffusionGenerator(net, dcfg, CLASSES, decoder=vae)
    images = torch.randint(0, 256, (2, 16, 24, 3), dtype=torch.uint8)
    holes = torch.zeros(2, 16, 24, dtype=torch.bool)
    holes[:, 5:11, 7:15] = True                       # not aligned to the 4-pixel cells
    out = gen.inpaint(images, holes, None, seed=1)
    assert out.shape == images.shape
    assert torch.equal(out[~holes], images[~holes])
    assert not torch.equal(out[holes], images[holes])


def test_latent_scheduler_does_not_clip():
    _, dcfg, _, _ = _latent_model()
    assert make_train_scheduler(dcfg).config.clip_sample is False
    assert make_train_scheduler(dataclasses.replace(dcfg, latent_channels=0, latent_factor=1)).config.clip_sample


def test_config_keeps_latent_fields_together():
    with pytest.raises(ConfigError, match="latent_channels'/'latent_factor"):
        DiffusionConfig(latent_channels=4)
    with pytest.raises(ConfigError, match="latent_channels'/'latent_factor"):
        DiffusionConfig(latent_factor=4)


def test_a_latent_checkpoint_carries_its_autoencoder_and_refuses_a_mismatched_one(tmp_path):
    net, dcfg, vae, vcfg = _latent_model()
    meta = {"vae": {"config": config_lib.asdict(vcfg), "latent_scale": 1.3}}
    path = ck.save(tmp_path / "ldm", net, dcfg, epoch=0, classes=CLASSES, extra_meta=meta,
                   extra_weights={"vae": vae.net})
    gen = load(path, expect="generator")
    assert gen.decoder is not None and gen.decoder.scale == 1.3 and gen.image_size == (16, 24)
    assert torch.equal(gen.generate(None, 1, seed=0), DiffusionGenerator(net, dcfg, CLASSES, decoder=vae)
                       .generate(None, 1, seed=0))
    # an autoencoder of another latent size: one line naming both
    other = dataclasses.replace(vcfg, latent_channels=4)
    bad = ck.save(tmp_path / "bad", net, dcfg, epoch=0, classes=CLASSES,
                  extra_meta={"vae": {"config": config_lib.asdict(other), "latent_scale": 1.0}},
                  extra_weights={"vae": build_vae(other)})
    with pytest.raises(ck.CheckpointError, match="4-channel latents at factor 4.*trained on 3 channels"):
        load(bad, expect="generator")
    # a latent checkpoint without its autoencoder
    bare = ck.save(tmp_path / "bare", net, dcfg, epoch=0, classes=CLASSES)
    with pytest.raises(ck.CheckpointError, match="without its autoencoder"):
        load(bare, expect="generator")
