import random

import numpy as np
import pytest
import torch

from genseg import engine
from genseg.config import SegConfig
from genseg.data.classes import SYNTHETIC, colorize, rgb_to_index
from genseg.data.shards import decode_row, encode_row
from genseg.data.synthetic import make_scene
from genseg.data.transforms import to_tensors
from genseg.models import build_segmenter

pytestmark = pytest.mark.unit


def test_synthetic_scenes_are_seeded_and_any_size():
    a, ma = make_scene(7, 3, 37, 53)
    b, mb = make_scene(7, 3, 37, 53)
    c, _ = make_scene(8, 3, 37, 53)
    assert a.tobytes() == b.tobytes() and ma.tobytes() == mb.tobytes()
    assert a.tobytes() != c.tobytes()
    assert a.shape == (37, 53, 3) and a.dtype == np.uint8 and ma.shape == (37, 53)
    classes = set()
    for i in range(30):
        classes |= set(np.unique(make_scene(0, i, 96, 128)[1]).tolist())
    assert len(classes) >= 6 and max(classes) < SYNTHETIC.num_classes


def test_shard_row_and_palette_round_trip():
    img, mask = make_scene(0, 0, 20, 30)
    i2, m2 = decode_row(encode_row("x", img, mask))
    assert np.array_equal(i2, img) and np.array_equal(m2, mask)
    rgb = colorize(mask, SYNTHETIC.palette)
    assert np.array_equal(rgb_to_index(rgb, SYNTHETIC.palette), mask)


def _batch(n=8, h=48, w=64):
    pairs = [to_tensors(*make_scene(1, i, h, w)) for i in range(n)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def test_tiny_fcn_overfits_one_batch():
    torch.manual_seed(0)
    cfg = SegConfig(num_classes=7, width=8, lr=5e-3, schedule="constant", loss="ce_dice")
    model = build_segmenter(cfg)
    opt = engine.make_optimizer(model, cfg)
    images, masks = _batch()
    first = engine.train_one_epoch(model, opt, None, [(images, masks)], cfg, torch.device("cpu"))["train_loss"]
    for _ in range(40):
        last = engine.train_one_epoch(model, opt, None, [(images, masks)], cfg, torch.device("cpu"))["train_loss"]
    assert last < 0.4 * first, (first, last)
    cm, kept = engine.evaluate(model, zip(images, masks), 7, keep=2)
    assert cm.compute()["pixel_acc"] > 0.8
    assert len(kept) == 2 and kept[0][2].shape == masks[0].shape


def test_evaluate_resizes_logits_to_the_mask():
    cfg = SegConfig(num_classes=7, width=8)
    model = build_segmenter(cfg)
    image, mask = to_tensors(*make_scene(0, 0, 37, 53))
    logits = engine.predict_logits(model.eval(), image[None], (37, 53), infer_scale=0.5)
    assert logits.shape == (1, 7, 37, 53)
    cm, _ = engine.evaluate(model, [(image, mask)], 7, infer_scale=0.5)
    assert cm.mat.sum() == 37 * 53


def test_schedules_and_train_batches():
    cfg = SegConfig(num_classes=7, width=8, epochs=2, lr=1.0, schedule="poly", warmup_epochs=0.5)
    model = build_segmenter(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = engine.make_scheduler(opt, cfg.schedule, cfg.epochs, cfg.warmup_epochs, 10)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == pytest.approx(1.0)   # linear warmup over 5 steps
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.1
    rows = [encode_row(f"s{i}", *make_scene(0, i, 40, 50)) for i in range(3)]
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    cfg2 = SegConfig(num_classes=7, width=8, crop=(32, 32))
    (imgs, masks), = list(engine.train_batches([batch], cfg2, (32, 32), random.Random(0)))
    assert imgs.shape == (3, 3, 32, 32) and masks.shape == (3, 32, 32)
