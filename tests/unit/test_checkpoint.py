import json
import re
from pathlib import Path

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
    assert state["epoch"] == 1 and state["schedulers"]["model"]["last_epoch"] == 1
    opt2 = make_optimizer(m2, cfg)
    opt2.load_state_dict(state["optimizers"]["model"])
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


# ---------------------------------------------------------------- durability, format, corruption

def _saved(tmp_path, epoch=0, name="c", **kw):
    cfg = SegConfig(num_classes=2, width=8)
    torch.manual_seed(epoch)
    model = build_segmenter(cfg)
    opt = make_optimizer(model, cfg)
    return ck.save(tmp_path / name, model, cfg, epoch=epoch, optimizer=opt, **kw), model


def test_a_failed_rename_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path, old_model = _saved(tmp_path, epoch=0)
    real_rename = type(path).rename
    calls = []

    def failing_rename(self, target):
        calls.append((self.name, Path(target).name))
        if self.name.startswith(".c.tmp-"):          # the new checkpoint's rename into place
            raise OSError("disk vanished")
        return real_rename(self, target)

    monkeypatch.setattr(type(path), "rename", failing_rename)
    with pytest.raises(OSError, match="disk vanished"):
        _saved(tmp_path, epoch=1)
    monkeypatch.undo()
    # the old directory was moved aside (never deleted) before the failing rename, then put back
    assert calls[0][0] == "c" and calls[0][1].startswith(".c.old-")
    loaded = ck.load(path)
    assert loaded.epoch == 0
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in old_model.state_dict().items())
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


CRASH = """
import os, sys
from pathlib import Path
import torch
from genseg import checkpoint as ck
from genseg.config import SegConfig
from genseg.models import build_segmenter

path = Path(sys.argv[1])
cfg = SegConfig(num_classes=2, width=8)
ck.save(path, build_segmenter(cfg), cfg, epoch=0)
real = Path.rename
def rename(self, target):
    out = real(self, target)
    if self.name == path.name:      # the old checkpoint is aside, the new one not yet in: die
        os._exit(17)
    return out
Path.rename = rename
ck.save(path, build_segmenter(cfg), cfg, epoch=1)
"""


def test_a_crash_between_the_renames_is_recovered_on_load(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path / "c")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 17, proc.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "c" not in names and any(n.startswith(".c.old-") for n in names)   # only the aside copy survived
    assert ck.load(tmp_path / "c").epoch == 0                                  # ... and load finds it
    assert (tmp_path / "c" / "config.json").is_file()                          # renamed back into place


def test_format_version_old_format_and_newer_format(tmp_path):
    path, _ = _saved(tmp_path)
    doc = json.loads((path / "config.json").read_text())
    assert doc["format"] == ck.FORMAT == 2
    assert set(doc["files"]) == {"model.safetensors", "train_state.pt"}
    assert doc["files"]["model.safetensors"]["bytes"] == (path / "model.safetensors").stat().st_size
    # today's format without a version (format 1) still loads
    old = {k: v for k, v in doc.items() if k not in ("format", "files")}
    (path / "config.json").write_text(json.dumps(old))
    loaded = ck.load(path)
    assert loaded.format == 1 and loaded.config.width == 8 and ck.load_train_state(path)["epoch"] == 0
    (path / "config.json").write_text(json.dumps({**doc, "format": 3}))
    with pytest.raises(ck.CheckpointError, match=r"format 3 was written by a newer genseg.*upgrade genseg"):
        ck.load(path)


def test_removed_field_is_refused_and_renamed_field_is_migrated(tmp_path, monkeypatch):
    path, _ = _saved(tmp_path)
    doc = json.loads((path / "config.json").read_text())
    fields = dict(doc["fields"])
    fields["base_width"] = fields.pop("width")
    (path / "config.json").write_text(json.dumps({**doc, "fields": fields}))
    with pytest.raises(ck.CheckpointError, match=r"config field\(s\) base_width no longer exist in SegConfig.*"
                                                 r"RENAMED_FIELDS"):
        ck.load(path)
    monkeypatch.setitem(ck.RENAMED_FIELDS, "SegConfig", {"base_width": "width"})
    assert ck.load(path).config.width == 8


@pytest.mark.parametrize("digests", [True, False], ids=["format2", "format1"])
@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors", "train_state.pt"])
def test_truncated_file_raises_checkpoint_error_naming_it(tmp_path, name, digests):
    cfg = SegConfig(num_classes=2, width=8)
    model = build_segmenter(cfg)
    path = ck.save(tmp_path / "c", model, cfg, epoch=0, optimizer=make_optimizer(model, cfg),
                   extra_weights={"ema": model}, extra_state={"rng": {"torch": torch.get_rng_state()}})
    if not digests:                       # an old checkpoint: the file itself has to be parsed to notice
        doc = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({k: v for k, v in doc.items() if k not in ("format", "files")}))
    f = path / name
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    read = {"model.safetensors": ck.load, "ema.safetensors": lambda p: ck.load_weights(p, "ema"),
            "train_state.pt": ck.load_train_state}[name]
    with pytest.raises(ck.CheckpointError, match=re.escape(str(f)) + ".*(truncated|damaged)"):
        read(path)


def test_damaged_bytes_of_the_same_size_are_caught_by_the_digest(tmp_path):
    path, _ = _saved(tmp_path)
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-8:] = bytes(8)                  # last tensor bytes zeroed: safetensors would load this silently
    f.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match="model.safetensors: damaged .*SHA-256"):
        ck.load(path)


def test_train_state_with_rng_states_loads_with_weights_only(tmp_path):
    import random

    from genseg import rng

    g = torch.Generator().manual_seed(3)
    r = random.Random(4)
    state = rng.capture({"noise": g, "augment": r})
    path, _ = _saved(tmp_path, extra_state={"rng": [state]})
    loaded = ck.load_train_state(path)["rng"][0]            # torch.load(weights_only=True) accepted it
    expect = (torch.rand(3, generator=g), r.random())
    g2, r2 = torch.Generator(), random.Random()
    rng.restore(loaded, {"noise": g2, "augment": r2})
    assert torch.equal(torch.rand(3, generator=g2), expect[0]) and r2.random() == expect[1]


def test_train_state_from_before_named_optimizers_still_resumes(tmp_path):
    """Checkpoints written with one ``optimizer`` key load as ``optimizers["model"]``."""
    from genseg import checkpoint as ck
    from genseg.config import SegConfig
    from genseg.models import build_segmenter

    cfg = SegConfig(num_classes=3, width=8)
    model = build_segmenter(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, 3, 64, 64)).sum().backward()
    opt.step()
    path = ck.save(tmp_path / "c", model, cfg, epoch=2, optimizer=opt)
    state = torch.load(path / ck.STATE_FILE, weights_only=True)
    legacy = {"epoch": 2, "optimizer": state["optimizers"]["model"], "scheduler": None}
    torch.save(legacy, path / ck.STATE_FILE)
    doc = json.loads((path / ck.CONFIG_FILE).read_text())
    doc["files"][ck.STATE_FILE] = ck._describe(path / ck.STATE_FILE)
    (path / ck.CONFIG_FILE).write_text(json.dumps(doc))
    loaded = ck.load_train_state(path)
    assert set(loaded["optimizers"]) == {"model"} and loaded["schedulers"] == {} and "optimizer" not in loaded
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(loaded["optimizers"]["model"])
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
