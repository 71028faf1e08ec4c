"""Resumable randomness through the real CLI on one CPU worker: 4 epochs straight and 2 epochs +
resume to 4 end in IDENTICAL weights (and EMA weights), because checkpoints carry every random
state (global generators and the loop's own), the data order of an epoch depends only on
(seed, epoch), and the optimizer/scheduler/EMA state is restored."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genseg import checkpoint as ck
from jobs.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _final(wd: Path, run: str, epoch: int) -> Path:
    """The run's checkpoint directory of ``epoch`` (Ray keeps the latest and the best)."""
    found = [d for d in (wd / "ray" / run).glob("checkpoint_*") if d.is_dir() and ck.load(d).epoch == epoch]
    assert found, f"no checkpoint of epoch {epoch} in {wd / 'ray' / run}"
    return found[0]


def _same_tensors(a: Path, b: Path, name: str) -> None:
    ta, tb = load_file(str(a / name)), load_file(str(b / name))
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{name}: {len(differ)} of {len(ta)} tensors differ, e.g. {differ[0]}"


def _straight_and_resumed(tmp_path, task: str, tiny: list[str]) -> tuple[Path, Path]:
    wd, data = tmp_path / "wd", str(tmp_path / "shards")
    assert main(["prepare", "--source", "synthetic", "--num", "15", "--size", "16x16", "--out", data,
                 "--workdir", str(wd)]) == 0
    base = ["train", task, "--data", data, "--workers", "1", "--workdir", str(wd), *tiny]
    assert main([*base, "--run-name", "straight", "--epochs", "4"]) == 0
    assert main([*base, "--run-name", "resumed", "--epochs", "2"]) == 0
    assert main([*base, "--run-name", "resumed", "--epochs", "4", "--json", str(tmp_path / "r.json")]) == 0
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["resumed"] is True and summary["final_epoch"] == 3
    return _final(wd, "straight", 3), _final(wd, "resumed", 3)


def test_seg_straight_and_resumed_runs_end_identical(ray_cluster, tmp_path):
    # constant LR: a poly/cosine schedule is stretched to the new --epochs on resume by design
    tiny = ["--set", "width=8", "--set", "schedule=constant", "--batch-size", "4", "--set", "image_every=100"]
    straight, resumed = _straight_and_resumed(tmp_path, "seg", tiny)
    _same_tensors(straight, resumed, "model.safetensors")
    # the augmentation stream really was consumed (flips/crops/scales) and really was restored
    s_state, r_state = ck.load_train_state(straight), ck.load_train_state(resumed)
    assert torch.equal(s_state["rng"][0]["named"]["augment"]["python"]["words"],
                       r_state["rng"][0]["named"]["augment"]["python"]["words"])
    assert torch.equal(s_state["rng"][0]["torch"], r_state["rng"][0]["torch"])


def test_diffusion_straight_and_resumed_runs_end_identical(ray_cluster, tmp_path):
    tiny = ["--set", "channels=16,32", "--batch-size", "4", "--set", "sample_steps=2", "--set", "sample_every=100",
            "--set", "timesteps=50"]
    straight, resumed = _straight_and_resumed(tmp_path, "diffusion", tiny)
    _same_tensors(straight, resumed, "model.safetensors")
    _same_tensors(straight, resumed, "ema.safetensors")
    s_state, r_state = ck.load_train_state(straight), ck.load_train_state(resumed)
    assert s_state["ema_updates"] == r_state["ema_updates"] == 4 * 3     # 12 train rows / 4 per step, 4 epochs
    assert torch.equal(s_state["rng"][0]["named"]["noise"]["torch"], r_state["rng"][0]["named"]["noise"]["torch"])
