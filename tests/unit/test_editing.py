import numpy as np
import pytest
import torch

from genseg.config import DiffusionConfig
from genseg.data.synthetic import make_scene
from genseg.diffusion.generator import DiffusionGenerator
from genseg.editing import EditOptions, dilate, fill_labels, remove_objects, replace_background
from genseg.models.unet import build_diffusion_model
from genseg.segmenter import Segmenter

pytestmark = pytest.mark.unit


def test_fill_labels_grows_surrounding_classes_into_the_hole():
    lab = np.zeros((6, 8), np.int64)
    lab[:, 4:] = 2
    hole = np.zeros((6, 8), bool)
    hole[2:4, 2:6] = True
    lab[hole] = 9
    filled = fill_labels(lab, hole)
    assert 9 not in filled
    assert (filled[:, :4] == 0).all() and (filled[:, 4:] == 2).all()


def test_dilate_grows_by_radius():
    m = np.zeros((7, 7), bool)
    m[3, 3] = True
    assert dilate(m, 1).sum() == 9 and dilate(m, 0).sum() == 1


class _ConstNet(torch.nn.Module):
    """Predicts class 5 in the left half, 0 elsewhere: a known region to edit."""

    def forward(self, x):
        out = torch.zeros(x.shape[0], 7, *x.shape[-2:])
        out[:, 0] = 1
        out[:, 5, :, : x.shape[-1] // 2] = 2
        return out


def _ConstSegmenter():
    from genseg.config import SegConfig

    return Segmenter(_ConstNet(), SegConfig(num_classes=7, width=8))


def _generator(cfg):
    from genseg.generation import SamplingSettings

    return DiffusionGenerator(build_diffusion_model(cfg), cfg, sampling=SamplingSettings("ddim", 3, 1.0))


@pytest.mark.parametrize("cond", ["mask", "none"])
def test_edits_touch_only_the_selected_region(cond):
    torch.manual_seed(0)
    cfg = DiffusionConfig(cond=cond, num_classes=7, channels=(8, 16), image_size=(16, 16), timesteps=50)
    gen = _generator(cfg)
    image, _ = make_scene(0, 1, 24, 30)
    opts = EditOptions(dilate=0, feather=2)
    out, region, labels = remove_objects(_ConstSegmenter(), gen, image, [5], opts)
    assert region[:, :15].all() and not region[:, 15:].any()
    assert np.array_equal(out[~region], image[~region]) and not np.array_equal(out[region], image[region])
    out2, region2, _ = replace_background(_ConstSegmenter(), gen, image, [5], np.full((8, 8), 2), opts)
    assert np.array_equal(region2, ~region)
    assert np.array_equal(out2[region], image[region])      # the kept foreground is bit-identical


def test_nothing_selected_returns_the_input():
    cfg = DiffusionConfig(cond="none", num_classes=7, channels=(8, 16), image_size=(16, 16), timesteps=50)
    image, _ = make_scene(0, 2, 16, 16)
    out, region, _ = remove_objects(_ConstSegmenter(), _generator(cfg), image, [6], EditOptions(dilate=0))
    assert not region.any() and np.array_equal(out, image)


def test_hole_at_model_size_covers_every_partly_selected_pixel():
    from genseg.editing import model_inputs

    image = np.zeros((40, 60, 3), np.uint8)
    region = np.zeros((40, 60), bool)
    region[10, 31] = True                      # one image pixel; each model pixel covers 10x10 image pixels
    _, m, _ = model_inputs(image, region, None, (4, 6))
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[1, 3] = True                      # rows 10..19 -> model row 1, cols 30..39 -> model col 3
    assert torch.equal(m[0], expected)
