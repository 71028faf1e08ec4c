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


class _Painter:
    """A generator whose fill is known: hole pixels become red.  It records what it was given."""

    def __init__(self, size, conditional=False):
        self.image_size, self.conditional, self.num_classes, self.calls = size, conditional, 7, []

    def inpaint(self, images, holes, cond, seed, resample=1, **sampling):
        self.calls.append((images.clone(), holes.clone(), None if cond is None else cond.clone()))
        out = images.clone()
        out[holes] = torch.tensor([255, 0, 0], dtype=torch.uint8)
        return out


def test_crop_box_has_the_models_aspect_and_stays_inside():
    from genseg.editing import crop_box

    region = np.zeros((40, 60), bool)
    region[10:14, 20:26] = True
    assert crop_box(region, (8, 10), 2) == (8, 18, 8, 10)          # 4x6 + 2 each side = 8x10, aspect 0.8
    region = np.zeros((40, 60), bool)
    region[0:2, 55:60] = True                                      # in a corner: shifted inside the image
    top, left, h, w = crop_box(region, (8, 8), 1)
    assert (h, w) == (7, 7) and top == 0 and left + w == 60
    region[:, :] = True
    assert crop_box(region, (8, 10), 4) == (0, 0, 40, 60)          # cannot grow past the image


def test_crop_mode_fills_the_box_at_model_size_and_pastes_it_back_in_place():
    from genseg.editing import _fill

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    region = np.zeros((40, 60), bool)
    region[10:14, 20:26] = True
    gen = _Painter((8, 10))
    out = _fill(gen, image, region, None, EditOptions(dilate=0, feather=0, crop=True, margin=2))
    given, holes, _ = gen.calls[0]
    assert np.array_equal(given[0].numpy(), image[8:16, 18:28])   # the box, at the model's size unchanged
    assert holes[0].sum() == 24
    assert (out[region] == [255, 0, 0]).all()                       # the fill lands on the region ...
    assert np.array_equal(out[~region], image[~region])             # ... and nowhere else


def test_outpaint_grows_the_canvas_and_keeps_the_original():
    from genseg.editing import outpaint

    image, _ = make_scene(0, 3, 24, 30)
    gen = _Painter((8, 8), conditional=True)
    out, new, labels = outpaint(_ConstSegmenter(), gen, image, {"left": 6, "bottom": 2}, opts=EditOptions(feather=0))
    assert out.shape == (26, 36, 3) and new.sum() == 26 * 36 - 24 * 30
    assert np.array_equal(out[:24, 6:], image)                      # the original, bit for bit, shifted
    assert (out[new] == [255, 0, 0]).all()
    # the condition: the segmenter's labels (class 5 on the left half) grown into the new strip
    assert (labels[:24, :6] == 5).all() and (labels[24:, 6:21] == 5).all() and (labels[24:, 22:] == 0).all()
    with pytest.raises(ValueError, match="extend needs"):
        outpaint(_ConstSegmenter(), gen, image, {"middle": 4})


def test_boundary_contrast_sees_a_seam():
    from genseg.metrics.generation import boundary_contrast

    rng = torch.Generator().manual_seed(0)
    texture = torch.rand(1, 3, 32, 32, generator=rng) * 0.2 + 0.4
    region = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    region[..., 8:24, 8:24] = True
    seamless = boundary_contrast(texture, region)
    assert 0.8 < seamless["ratio"] < 1.25                           # the same texture on both sides
    seam = texture.clone()
    seam[..., 8:24, 8:24] += 0.3                                    # a brighter fill: a step at its border
    assert boundary_contrast(seam, region)["ratio"] > 2
    assert np.isnan(boundary_contrast(texture, torch.zeros_like(region))["ratio"])
