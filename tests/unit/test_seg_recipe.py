"""The pieces of a segmentation recipe that generalises (issue 14), without Ray: the holdout split of
named sequences, photometric augmentation, class weightings, OHEM, test-time augmentation, and the
choice of the best checkpoint on a named split."""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from genseg import engine
from genseg.config import ConfigError, SegConfig
from genseg.data.transforms import (ColorJitter, RandomBlur, RandomGamma, denormalize, gaussian_blur, mix_batch,
                                    to_tensors, train_transforms)
from genseg.losses import get_loss, ohem_cross_entropy
from genseg.viz import error_map, quad
from pipelines import sources

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------ the holdout split

def _sequences(root, names_by_seq: dict[str, int]):
    """A folder source of tiny pairs named like CamVid frames: <SEQ>_<frame>.png."""
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    for seq, n in names_by_seq.items():
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(images / f"{seq}_{i:06d}.png")
            Image.fromarray(np.full((8, 8), i % 2, np.uint8)).save(masks / f"{seq}_{i:06d}.png")
    return images, masks


def test_holdout_moves_exactly_the_named_sequences(tmp_path):
    images, masks = _sequences(tmp_path, {"0001TP": 4, "0006R0": 5, "0016E5": 6})
    src = sources.folder(images, masks, num_classes=2, val_fraction=0.2, holdout=["0006R0"])
    by = {s: {it["name"] for it in src.items if it["split"] == s} for s in ("train", "val", "holdout")}
    assert by["holdout"] == {f"0006R0_{i:06d}" for i in range(5)}
    assert not by["holdout"] & (by["train"] | by["val"]) and not by["train"] & by["val"]
    assert len(by["train"]) + len(by["val"]) == 10 and len(by["val"]) == 2          # val drawn from the rest
    assert all(not n.startswith("0006R0") for n in by["train"] | by["val"])
    # two prefixes at once, and the same pairs for the same seed
    two = sources.folder(images, masks, num_classes=2, holdout=["0006R0", "0001TP"])
    assert sum(it["split"] == "holdout" for it in two.items) == 9
    again = sources.folder(images, masks, num_classes=2, val_fraction=0.2, holdout=["0006R0"])
    assert [it["split"] for it in again.items] == [it["split"] for it in src.items]


def test_camvid_holdout_takes_training_frames_only(tmp_path):
    for split, seqs in (("train", {"0001TP": 2, "0016E5": 3}), ("val", {"0016E5": 2})):
        (tmp_path / split).mkdir()
        (tmp_path / f"{split}annot").mkdir()
        for seq, n in seqs.items():
            for i in range(n):
                name = f"{seq}_{split}{i}.png"
                Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / split / name)
                Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / f"{split}annot" / name)
    src = sources.camvid(tmp_path, ["train", "val"], holdout=["0016E5"])
    split_of = {it["name"]: it["split"] for it in src.items}
    assert split_of == {"0001TP_train0": "train", "0001TP_train1": "train", "0016E5_train0": "holdout",
                        "0016E5_train1": "holdout", "0016E5_train2": "holdout", "0016E5_val0": "val",
                        "0016E5_val1": "val"}


@pytest.mark.parametrize("holdout, message", [
    (["Seq05VD"], "--holdout Seq05VD: no train image's name starts with 'Seq05VD' (their sequences: 0001TP, 0006R0)"),
    (["0001TP", "0006R0"], "would move every training image (9) into holdout; leave at least one sequence"),
])
def test_a_bad_holdout_is_one_line(tmp_path, holdout, message):
    images, masks = _sequences(tmp_path, {"0001TP": 4, "0006R0": 5})
    with pytest.raises(sources.SourceError) as e:
        sources.folder(images, masks, num_classes=2, holdout=holdout)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_holdout_prefixes_are_parsed_and_an_empty_one_is_refused():
    assert sources.holdout_prefixes("0006R0, 0001TP,0006R0") == ["0006R0", "0001TP"]
    assert sources.holdout_prefixes(None) == []
    with pytest.raises(sources.SourceError, match="at least one file-name prefix"):
        sources.holdout_prefixes(" , ")


# ------------------------------------------------------------------ photometric augmentation

def _pattern(h=40, w=56, k=6):
    """A mask of blocks and the image that paints it: class c is grey level 30 + 40c."""
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy // 7) * 3 + xx // 9) % k
    image = np.repeat((30 + 40 * mask)[..., None], 3, axis=2).astype(np.uint8)
    return image, mask.astype(np.uint8)


@pytest.mark.parametrize("photometric", [ColorJitter(0.5), RandomGamma(0.6), RandomBlur(1.0)])
def test_photometric_changes_the_image_and_never_the_mask(photometric):
    image, mask = _pattern()
    img, m = to_tensors(image, mask)
    out_img, out_m = photometric(img, m, random.Random(1))
    assert out_m is m                                          # the very same labels, untouched
    assert out_img.shape == img.shape and not torch.equal(out_img, img)


def test_the_config_switches_photometric_augmentation_on_in_training_batches():
    """``jitter``/``gamma``/``blur`` reach the training batches: the same seed gives the same labels
    and geometry, and other colours only when they are on."""
    from genseg.data.shards import encode_row

    image, mask = _pattern()
    rows = [encode_row("r0", image, mask)]      # one image: the photometric draws come after its geometry
    batch = {k: [r[k] for r in rows] for k in rows[0]}

    def run(**photo):
        cfg = SegConfig(num_classes=6, scale_min=1.0, scale_max=1.0, hflip=False, **photo)
        return next(engine.train_batches([batch], cfg, (32, 48), random.Random(0)))

    x0, m0 = run()
    again, _ = run()
    for photo in ({"jitter": 0.5}, {"gamma": 0.5}, {"blur": 1.0}):
        x, m = run(**photo)
        assert torch.equal(m, m0) and not torch.equal(x, x0), photo
    assert torch.equal(again, x0)


def test_the_full_pipeline_keeps_masks_aligned_with_images_and_invents_no_class():
    """Geometry first, then colour: with the same seed the labels and geometry are those of the
    geometry-only pipeline, and the (monotone) photometric changes keep each class's grey level
    ordered, so the classes can still be read back from the image where the blur has not mixed them."""
    image, mask = _pattern()
    geo = train_transforms((32, 48), 0.8, 1.25, True, 255)
    full = train_transforms((32, 48), 0.8, 1.25, True, 255, jitter=0.0, gamma=0.5, blur=0.0)
    for seed in range(6):
        i_geo, m_geo = geo(*to_tensors(image, mask), random.Random(seed))
        i_full, m_full = full(*to_tensors(image, mask), random.Random(seed))
        assert torch.equal(m_full, m_geo)
        assert set(m_full.unique().tolist()) <= set(range(6)) | {255}
        valid = m_geo != 255
        # geometry-only: the grey level still encodes the label exactly where the mask is valid
        levels = torch.from_numpy(denormalize(i_geo)[..., 0].astype(np.int64))
        interior = valid & (F.max_pool2d(m_geo[None, None].float(), 3, 1, 1)[0, 0] ==
                            -F.max_pool2d(-m_geo[None, None].float(), 3, 1, 1)[0, 0])
        assert torch.equal(((levels[interior] - 30) / 40).round().long(), m_geo[interior])
        # gamma is monotone: the order of the class levels survives in the augmented image
        g = torch.from_numpy(denormalize(i_full)[..., 0].astype(np.int64))
        means = [g[interior & (m_geo == c)].float().mean().item() for c in range(6) if (interior & (m_geo == c)).any()]
        assert means == sorted(means)
    with_all = train_transforms((32, 48), 0.8, 1.25, True, 255, jitter=0.4, gamma=0.4, blur=0.5)
    _, m_all = with_all(*to_tensors(image, mask), random.Random(3))
    _, m_geo = geo(*to_tensors(image, mask), random.Random(3))
    assert torch.equal(m_all, m_geo)


def test_gaussian_blur_keeps_a_flat_image_and_the_mean():
    flat = torch.full((3, 12, 16), 0.3)
    assert torch.allclose(gaussian_blur(flat, 1.0), flat, atol=1e-6)
    x = torch.rand(3, 20, 24)
    y = gaussian_blur(x, 1.2)
    assert y.shape == x.shape and y.std() < x.std()


def test_photometric_settings_are_bounded():
    with pytest.raises(ConfigError, match="'jitter' must be between 0 and 0.9"):
        SegConfig(jitter=1.5)
    with pytest.raises(ConfigError, match="'blur' must be between 0 and 1"):
        SegConfig(blur=-0.1)


# ------------------------------------------------------------------ mixing two samples (CutMix, ClassMix)

def _tagged_batch(b=4, h=24, w=32, k=5, seed=0):
    """Masks of random blocks (ignore along the top rows); each image carries its own labels in
    channel 0 and its sample index in channel 1, so every output pixel says where it came from."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, k, (b, h // 4, w // 4), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)
    masks[:, :2] = 255
    images = torch.stack([masks.float(), torch.arange(b).float()[:, None, None].expand(b, h, w),
                          torch.zeros(b, h, w)], dim=1)
    return images, masks


@pytest.mark.parametrize("kind", ["cutmix", "classmix"])
def test_mixing_moves_image_and_label_pixels_together_from_the_next_sample(kind):
    images, masks = _tagged_batch()
    images_before, masks_before = images.clone(), masks.clone()
    for seed in range(5):
        out_i, out_m = mix_batch(images, masks, kind, 1.0, random.Random(seed))
        assert torch.equal(out_i[:, 0].long(), out_m)                    # each label stays with its pixel
        assert set(out_m.unique().tolist()) <= set(masks.unique().tolist())
        b = images.shape[0]
        for i in range(b):
            source = out_i[i, 1].long()
            j = (i + 1) % b
            taken = source == j
            # only the sample itself and its partner as it was before mixing (never a mixed partner)
            assert bool(((source == i) | taken).all())
            assert taken.any() and not taken.all(), (kind, seed, i)
            assert torch.equal(out_m[i][taken], masks[j][taken]) and torch.equal(out_m[i][~taken], masks[i][~taken])
    assert torch.equal(images, images_before) and torch.equal(masks, masks_before)   # the inputs are not written to


def test_classmix_pastes_whole_classes_half_of_them_and_never_the_ignored_pixels():
    images, masks = _tagged_batch(k=6)
    out_i, out_m = mix_batch(images, masks, "classmix", 1.0, random.Random(3))
    for i in range(4):
        j = (i + 1) % 4
        taken = out_i[i, 1].long() == j
        present = [c for c in masks[j].unique().tolist() if c != 255]
        pasted = [c for c in present if taken[masks[j] == c].any()]
        for c in pasted:                                                 # every pixel of a chosen class
            assert bool(taken[masks[j] == c].all()), c
        assert len(pasted) == (len(present) + 1) // 2
        assert not taken[masks[j] == 255].any()


def test_cutmix_pastes_one_box_of_a_quarter_to_a_half_of_the_crop():
    images, masks = _tagged_batch(h=40, w=48)
    for seed in range(8):
        out_i, _ = mix_batch(images, masks, "cutmix", 1.0, random.Random(seed))
        for i in range(4):
            taken = out_i[i, 1].long() == (i + 1) % 4
            rows, cols = taken.any(1).nonzero()[:, 0], taken.any(0).nonzero()[:, 0]
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert int(taken.sum()) == int(box)                          # a filled rectangle
            assert 0.2 * 40 * 48 <= int(box) <= 0.55 * 40 * 48


def test_mixing_follows_its_probability_and_seed():
    images, masks = _tagged_batch(b=8)
    # off, never, or no partner (a batch of one): the batch itself back, and no draw from the stream,
    # so a run without mixing keeps the random stream (and the batches) it had before mixing existed
    for kind, p, b in (("none", 0.5, 8), ("none", 1.0, 8), ("cutmix", 0.0, 8), ("classmix", 0.0, 8),
                       ("classmix", 1.0, 1), ("cutmix", 1.0, 1)):
        r = random.Random(0)
        state = r.getstate()
        out_i, out_m = mix_batch(images[:b], masks[:b], kind, p, r)
        assert torch.equal(out_i, images[:b]) and torch.equal(out_m, masks[:b]), (kind, p, b)
        assert r.getstate() == state, (kind, p, b)
    mixed = [int(((mix_batch(images, masks, "cutmix", 0.5, random.Random(s))[0][:, 1]
                   != images[:, 1]).flatten(1).any(1)).sum()) for s in range(40)]
    assert any(0 < n < 8 for n in mixed)                                 # decided per sample, not per batch
    assert 3.0 <= sum(mixed) / len(mixed) <= 5.0                         # about half of the 8 samples
    a = mix_batch(images, masks, "classmix", 0.5, random.Random(7))
    b = mix_batch(images, masks, "classmix", 0.5, random.Random(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_the_config_switches_mixing_on_in_training_batches():
    """``mix`` reaches the training batches: each sample is mixed only with its batch's own
    augmented samples (those of the same seed without mixing), labels moving with their pixels."""
    from genseg.data.shards import encode_row

    rows = []
    for r in range(4):
        image, mask = _pattern()
        mask = (mask + r) % 6                                            # four different label maps
        rows.append(encode_row(f"r{r}", (30 + 40 * mask[..., None].repeat(3, 2)).astype(np.uint8), mask))
    batch = {k: [r[k] for r in rows] for k in rows[0]}

    def run(**mix):
        cfg = SegConfig(num_classes=6, scale_min=1.0, scale_max=1.0, hflip=False, **mix)
        return next(engine.train_batches([batch], cfg, (32, 48), random.Random(0)))

    x0, m0 = run()
    x, m = run(mix="classmix", mix_p=1.0)
    assert not torch.equal(m, m0)
    for i in range(4):
        own, partner = m == m0[i], m == m0[(i + 1) % 4]
        assert bool((own[i] | partner[i]).all())
        assert torch.equal(x[i][:, own[i]], x0[i][:, own[i]])
        took = ~own[i]
        assert torch.equal(x[i][:, took], x0[(i + 1) % 4][:, took])


def test_mix_settings_are_checked():
    with pytest.raises(ConfigError, match="'mix'.*mixup"):
        SegConfig(mix="mixup")
    with pytest.raises(ConfigError, match="'mix_p' must be between 0 and 1"):
        SegConfig(mix="cutmix", mix_p=1.5)


# ------------------------------------------------------------------ class weights

def _manifest(train_pixels, all_pixels=None):
    return {"num_classes": len(train_pixels), "ignore_index": 255, "classes": {"names": list("abcd")[:len(train_pixels)]},
            "class_pixels": all_pixels or train_pixels, "splits": {"train": {"class_pixels": train_pixels}}}


def test_inverse_sqrt_weights_are_the_square_root_balance_of_the_training_pixels():
    from jobs.train_seg import build_config, inverse_sqrt_weights

    m = _manifest([900, 100, 25, 0], all_pixels=[1, 1, 1, 1])   # the whole set's counts would give all 1
    w = inverse_sqrt_weights(m)
    raw = np.array([1 / math.sqrt(0.9), 1 / math.sqrt(0.1), 1 / math.sqrt(0.025)])
    assert w[3] == 0.0 and np.allclose(w[:3], raw / raw.mean(), atol=1e-4)
    assert w[1] / w[0] == pytest.approx(3.0, rel=1e-3)                       # 9x rarer weighs 3x
    cfg = build_config(m, SegConfig(), "inv-sqrt:1.5")
    assert cfg.class_weights == tuple(min(v, 1.5) for v in w) and max(cfg.class_weights) == 1.5
    capped = build_config(_manifest([900, 100, 25, 5]), SegConfig(), "median-freq:2")
    assert max(capped.class_weights) == 2.0 and min(capped.class_weights) < 1
    assert build_config(m, SegConfig(), "1,2,3,4").class_weights == (1, 2, 3, 4)
    assert build_config(m, SegConfig(), "none").class_weights is None
    # a weighting named per run (a Tune trial's) replaces the base's weights, uniform ones too
    weighted = build_config(m, SegConfig(), "inv-sqrt")
    assert build_config(m, weighted, "none").class_weights is None
    assert build_config(m, weighted, "median-freq:2").class_weights == build_config(m, SegConfig(), "median-freq:2").class_weights
    assert build_config(m, weighted, None).class_weights == weighted.class_weights


@pytest.mark.parametrize("text, message", [("sqrt", "unknown weighting 'sqrt'"),
                                           ("median-freq:0", "the cap must be a number > 0"),
                                           ("none:3", "the cap must be a number > 0")])
def test_a_bad_weighting_is_one_line(text, message):
    from jobs.train_seg import build_config

    with pytest.raises(ConfigError, match=message):
        build_config(_manifest([1, 2, 3, 4]), SegConfig(), text)


# ------------------------------------------------------------------ OHEM

def test_ohem_averages_only_the_hard_pixels_and_keeps_a_minimum():
    # 2 classes, 8 labelled pixels: p(true) = 0.9 for six of them (easy), 0.3 and 0.1 for two (hard)
    p_true = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.3, 0.1])
    target = torch.zeros(1, 1, 9, dtype=torch.long)
    target[0, 0, 8] = 255                                          # one ignored pixel
    logits = torch.zeros(1, 2, 1, 9)
    logits[0, 0, 0, :8] = torch.log(p_true / (1 - p_true))         # softmax([l, 0]) = p
    ce = -torch.log(p_true)
    assert torch.allclose(ohem_cross_entropy(logits, target, threshold=0.7), ce[6:].mean())
    # fewer hard pixels than the minimum: the hardest min_kept share instead (4 of 8)
    assert torch.allclose(ohem_cross_entropy(logits, target, threshold=0.7, min_kept=0.5), ce.topk(4).values.mean())
    # with nothing hard below the threshold, plain CE of the hardest pixels
    assert torch.allclose(ohem_cross_entropy(logits, target, threshold=0.05, min_kept=1.0), ce.mean())
    # class weights scale each pixel's loss; the cut stays "p(true) < threshold" whatever the weight
    w = torch.tensor([2.0, 1.0])
    assert torch.allclose(ohem_cross_entropy(logits, target, w, threshold=0.7), 2 * ce[6:].mean())
    assert get_loss("ohem") is ohem_cross_entropy
    both = get_loss("ohem_dice")(logits, target)
    assert both > ohem_cross_entropy(logits, target)


# ------------------------------------------------------------------ test-time augmentation

class _Asymmetric(torch.nn.Module):
    """A model whose logits depend on where a pixel is (so a flipped input does not give flipped logits)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        ramp = torch.linspace(0, 1, x.shape[-1])
        return self.conv(x) + ramp


def test_flip_tta_is_the_mean_of_the_plain_and_the_flipped_back_logits():
    torch.manual_seed(0)
    model, x = _Asymmetric().eval(), torch.randn(1, 3, 12, 16)
    plain = engine.predict_logits(model, x, (12, 16))
    with torch.no_grad():
        want = (model(x) + model(x.flip(-1)).flip(-1)) / 2
    got = engine.predict_logits(model, x, (12, 16), flip=True)
    assert torch.equal(got, want) and not torch.equal(got, plain)
    # multi-scale: the mean of each scale's logits, resized to the label size before averaging
    with torch.no_grad():
        half = F.interpolate(model(F.interpolate(x, size=(6, 8), mode="bilinear", align_corners=False)), size=(12, 16),
                             mode="bilinear", align_corners=False)
    assert torch.allclose(engine.predict_logits(model, x, (12, 16), scales=(0.5, 1.0)), (half + model(x)) / 2)


def test_tta_scales_are_relative_to_the_models_infer_scale():
    """A model trained at half resolution (infer_scale 0.5) with scales (1, 2) and flip runs at 0.5x
    and 1x the image, plain and mirrored: four logit maps, each resized to the label before the mean."""
    torch.manual_seed(0)
    model, x = _Asymmetric().eval(), torch.randn(1, 3, 12, 16)

    def at(size, mirrored):
        xi = x if size == (12, 16) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        out = model(xi.flip(-1)).flip(-1) if mirrored else model(xi)
        return out if size == (12, 16) else F.interpolate(out, size=(12, 16), mode="bilinear", align_corners=False)

    with torch.no_grad():
        want = sum(at(size, m) for size in ((6, 8), (12, 16)) for m in (False, True)) / 4
        plain_half = at((6, 8), False)
    got = engine.predict_logits(model, x, (12, 16), infer_scale=0.5, flip=True, scales=(1.0, 2.0))
    assert torch.allclose(got, want, atol=1e-6)
    # without TTA the model runs at its infer_scale alone
    assert torch.allclose(engine.predict_logits(model, x, (12, 16), infer_scale=0.5), plain_half, atol=1e-6)

# ------------------------------------------------------------------ best checkpoint on a named split

def test_select_on_picks_the_checkpoint_best_on_that_split():
    from jobs.runner import pick_best
    from jobs.train_seg import TASK, task_for

    epochs = [("ep0", {"epoch": 0, "val_miou": 0.50, "holdout_miou": 0.30}),
              ("ep1", {"epoch": 1, "val_miou": 0.62, "holdout_miou": 0.35}),   # best on val
              ("ep2", {"epoch": 2, "val_miou": 0.58, "holdout_miou": 0.41}),   # best on holdout
              ("ep3", {"epoch": 3, "val_miou": 0.55})]                         # no holdout score: loses
    assert pick_best(TASK, epochs)[0] == "ep1"
    on_holdout = task_for(SegConfig(select_on="holdout"))
    assert on_holdout.score == "holdout_miou" and on_holdout.scored_on(SegConfig(select_on="holdout")) == "holdout"
    assert pick_best(on_holdout, epochs)[0] == "ep2"
    assert task_for(SegConfig()) is TASK


def test_select_on_a_split_the_shards_lack_is_one_line(tmp_path):
    from jobs.train_seg import eval_splits

    m = {"splits": {"train": {}, "val": {}}}
    with pytest.raises(ConfigError) as e:
        eval_splits(tmp_path, m, SegConfig(select_on="holdout"))
    assert "--select-on holdout" in str(e.value) and "its splits: train, val" in str(e.value)
    assert "genseg prepare --holdout SEQ" in str(e.value)
    assert eval_splits(tmp_path, {"splits": {"train": {}, "val": {}, "holdout": {}}},
                       SegConfig(select_on="holdout")) == ["val", "holdout"]
    with pytest.raises(ConfigError, match="'select_on' must name an evaluation split"):
        SegConfig(select_on="train")
    # a test split is never scored during training, nor selected on
    with_test = {"splits": {"train": {}, "val": {}, "holdout": {}, "test": {}}}
    assert eval_splits(tmp_path, with_test, SegConfig()) == ["val", "holdout"]
    with pytest.raises(ConfigError, match="choosing a model on the test split spends it"):
        eval_splits(tmp_path, with_test, SegConfig(select_on="test"))


# ------------------------------------------------------------------ pictures

def test_error_map_marks_wrong_pixels_red_and_ignored_black():
    image = np.full((4, 6, 3), 200, np.uint8)
    mask = np.zeros((4, 6), np.int64)
    mask[0, 0] = 255
    pred = np.zeros((4, 6), np.int64)
    pred[1, 2] = 1
    e = error_map(image, mask, pred)
    assert tuple(e[1, 2]) == (230, 30, 30) and tuple(e[0, 0]) == (0, 0, 0)
    assert tuple(e[2, 2]) == (90, 90, 90)                      # right: the image, dimmed grey
    row = quad(image, mask, pred, [[0, 0, 0], [255, 255, 255]])
    assert row.shape == (4, 4 * 6 + 3 * 2, 3) and np.array_equal(row[:, -6:], e)


def test_class_weights_and_infer_scale_are_checked_and_sizes_read_as_lists():
    from genseg import config as config_lib

    for bad in ((1.0, float("nan"), 1.0), (1.0, float("inf"), 1.0), (-1.0, 1.0, 1.0), (0.0, 0.0, 0.0)):
        with pytest.raises(config_lib.ConfigError, match="needs finite weights >= 0, not all 0"):
            SegConfig(num_classes=3, class_weights=bad)
    assert SegConfig(num_classes=3, class_weights=(0.0, 1.0, 2.0)).class_weights == (0.0, 1.0, 2.0)   # one off is fine
    for bad in (0.0, -1.0, float("nan"), 5.0):
        with pytest.raises(config_lib.ConfigError, match="'infer_scale' must be a number in"):
            SegConfig(infer_scale=bad)
    for text in ("[176, 240]", "176x240", "176,240", "(176,240)"):
        assert config_lib.replace(SegConfig(), {"crop": text}).crop == (176, 240)


# a value other than the default for every SegConfig field (a new field must be added here)
OTHER_VALUES = {"arch": "fcn16s", "backbone": "resnet18", "width": 16, "norm": "ibn_b", "upsample": "bilinear",
                "num_classes": 5, "ignore_index": 0, "loss": "dice", "class_weights": (1.0,) * 6, "epochs": 3,
                "batch_size": 2, "lr": 0.1, "weight_decay": 0.0, "optimizer": "sgd", "schedule": "cosine",
                "warmup_epochs": 1.0, "crop": (32, 32), "scale_min": 0.5, "scale_max": 2.0, "hflip": False,
                "jitter": 0.3, "gamma": 0.3, "blur": 0.2, "mix": "classmix", "mix_p": 1.0, "infer_scale": 0.5,
                "select_on": "holdout",
                "image_every": 5, "seed": 3, "amp": "none", "threads_per_worker": 1}


def test_every_field_that_changes_the_network_must_match_to_resume_a_run():
    """A resumed run loads the saved weights into the network its config builds: a field that changes
    the network's parameters, left out of the task's model_fields, would pass the resume check and
    fail inside the workers with a state_dict traceback instead of one line."""
    import dataclasses

    from genseg.models import build_segmenter
    from jobs.train_seg import TASK

    assert set(OTHER_VALUES) == {f.name for f in dataclasses.fields(SegConfig)}
    assert all(v != getattr(SegConfig(), k) for k, v in OTHER_VALUES.items())

    def shapes(cfg):
        return {k: tuple(v.shape) for k, v in build_segmenter(cfg).state_dict().items()}

    changes = set()
    for base in (SegConfig(width=8), SegConfig(backbone="resnet18")):     # width changes the compact net only
        ref = shapes(base)
        changes |= {name for name, v in OTHER_VALUES.items()
                    if v != getattr(base, name) and shapes(dataclasses.replace(base, **{name: v})) != ref}
    assert changes == set(TASK.model_fields)
