import json

import pytest
import torch

from genseg import checkpoint as ck
from genseg.config import SegConfig
from genseg.engine import make_optimizer, make_scheduler
from genseg.models import build_segmenter

pytestmark = pytest.mark.unit


def test_round_trip_weights_config_and_train_state(tmp_path):
    cfg = SegConfig(num_classes=4, width=8, epochs=3)
    model = build_segmenter(cfg)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg.schedule, cfg.epochs, cfg.warmup_epochs, steps_per_epoch=5)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    opt.step()
    sched.step()
    path = ck.save(tmp_path / "c", model, cfg, epoch=1, metrics={"val_miou": 0.5},
                   classes={"names": ["a", "b", "c", "d"]}, optimizer=opt, scheduler=sched)
    loaded = ck.load(path)
    assert loaded.config == cfg and loaded.epoch == 1 and loaded.meta["metrics"]["val_miou"] == 0.5
    m2 = ck.build_model(loaded)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), m2(x))
    state = ck.load_train_state(path)
    assert state["epoch"] == 1 and state["scheduler"]["last_epoch"] == 1
    opt2 = make_optimizer(m2, cfg)
    opt2.load_state_dict(state["optimizer"])
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "train_state.pt"]


def test_not_a_checkpoint_and_corrupt_config(tmp_path):
    with pytest.raises(ck.CheckpointError, match="not a genseg checkpoint"):
        ck.load(tmp_path)
    cfg = SegConfig(num_classes=2, width=8)
    path = ck.save(tmp_path / "c", build_segmenter(cfg), cfg, epoch=0)
    doc = json.loads((path / "config.json").read_text())
    doc["fields"]["arch"] = "fcn2s"
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ck.CheckpointError, match="config.json"):
        ck.load(path)


def test_overwrite_is_atomic(tmp_path):
    cfg = SegConfig(num_classes=2, width=8)
    model = build_segmenter(cfg)
    ck.save(tmp_path / "c", model, cfg, epoch=0)
    ck.save(tmp_path / "c", model, cfg, epoch=5)
    assert ck.load(tmp_path / "c").epoch == 5
    assert [p.name for p in tmp_path.iterdir()] == ["c"]   # no temp dirs left behind
