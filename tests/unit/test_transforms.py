import random

import numpy as np
import pytest
import torch

from genseg.data.transforms import (RandomCrop, RandomHFlip, RandomScale, denormalize, resize_pair,
                                    to_tensors, train_transforms)

pytestmark = pytest.mark.unit


def _pair(h=37, w=53, k=5, seed=0):
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, k, (h, w)).astype(np.uint8)
    image = np.repeat((mask * 40)[..., None], 3, axis=2).astype(np.uint8)  # pixel value encodes label
    return image, mask


def test_to_tensors_round_trip():
    image, mask = _pair()
    img, m = to_tensors(image, mask)
    assert img.shape == (3, 37, 53) and img.dtype == torch.float32
    assert m.dtype == torch.int64 and torch.equal(m, torch.from_numpy(mask).long())
    assert np.array_equal(denormalize(img), image)


def test_crop_and_flip_keep_image_and_mask_aligned():
    image, mask = _pair()
    img, m = to_tensors(image, mask)
    rng = random.Random(3)
    tf = [RandomCrop((48, 64), 255), RandomHFlip(1.0)]   # crop larger than the input: pads
    for _ in range(5):
        i2, m2 = img, m
        for t in tf:
            i2, m2 = t(i2, m2, rng)
        assert i2.shape == (3, 48, 64) and m2.shape == (48, 64)
        pix = denormalize(i2)[..., 0].astype(int)
        valid = m2 != 255
        assert valid.sum() == 37 * 53                      # every original pixel kept exactly once
        assert np.array_equal(pix[valid.numpy()], (m2[valid] * 40).numpy())   # still aligned
        assert (pix[~valid.numpy()] == 128).all()            # padded image = the mean (0 normalised)


def test_scale_uses_nearest_for_masks():
    image, mask = _pair(20, 30, k=4)
    img, m = to_tensors(image, mask)
    i2, m2 = resize_pair(img, m, (40, 60))
    assert m2.dtype == torch.int64
    assert set(m2.unique().tolist()) <= set(range(4))
    assert torch.equal(m2, m.repeat_interleave(2, 0).repeat_interleave(2, 1))   # exact 2x nearest
    i3, m3 = RandomScale(0.5, 1.7)(img, m, random.Random(0))
    assert i3.shape[-2:] == m3.shape
    assert set(m3.unique().tolist()) <= set(range(4))


def test_full_training_pipeline_gives_fixed_crop_and_valid_labels():
    image, mask = _pair(37, 53, k=6)
    tf = train_transforms((32, 32), 0.6, 1.4, True, 255)
    rng = random.Random(1)
    for _ in range(10):
        i2, m2 = tf(*to_tensors(image, mask), rng)
        assert i2.shape == (3, 32, 32) and m2.shape == (32, 32)
        assert set(m2.unique().tolist()) <= set(range(6)) | {255}
