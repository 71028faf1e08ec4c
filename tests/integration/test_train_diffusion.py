"""Diffusion on real Ray + sqlite MLflow: train 1 epoch -> resume -> register -> sample."""
import json

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from genseg import checkpoint as ck
from jobs.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = ["--set", "channels=16,32", "--batch-size", "4", "--set", "sample_steps=3", "--set", "sample_every=1"]


def test_train_resume_register_and_sample(ray_cluster, tmp_path, capsys):
    wd, data = str(tmp_path / "wd"), str(tmp_path / "shards")
    assert main(["prepare", "--source", "synthetic", "--num", "12", "--size", "16x24", "--out", data,
                 "--workdir", wd]) == 0
    base = ["train", "diffusion", "--data", data, "--workers", "2", "--run-name", "d", "--workdir", wd, *TINY]
    assert main([*base, "--epochs", "1"]) == 0
    assert main([*base, "--epochs", "2", "--json", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["resumed"] and summary["final_epoch"] == 1 and summary["score"] == "val_loss"

    mlflow.set_tracking_uri(summary["tracking_uri"])
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("genseg-diffusion").experiment_id])
    assert len(runs) == 1
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss"))
    assert steps == [0, 1]
    assert len(client.list_artifacts(runs[0].info.run_id, "samples")) == 2
    champ = client.get_model_version_by_alias("genseg-diffusion", "champion")
    assert float(champ.tags["val_loss"]) == pytest.approx(summary["best_score"], abs=1e-5)

    best = ck.load(summary["best_checkpoint"])
    assert best.config.cond == "mask" and best.config.image_size == (16, 24) and best.config.num_classes == 7
    assert ck.load_weights(summary["best_checkpoint"], "ema") is not None

    out = tmp_path / "samples"
    assert main(["sample", "--num", "3", "--out", str(out), "--masks", data, "--steps", "3", "--guidance", "2",
                 "--seed", "5", "--workdir", wd]) == 0
    res = json.loads((out / "samples.json").read_text())
    assert res["num"] == 3 and res["conditioned"] and res["guidance"] == 2.0 and res["weights"] == "ema"
    first = np.asarray(Image.open(out / "sample_0000.png"))
    assert first.shape == (16, 24, 3) and (out / "label_0002.png").exists()
    assert np.asarray(Image.open(out / "grid.png")).shape[1] == 2 * 24      # label | sample
    # same seed -> same pixels
    assert main(["sample", "--num", "3", "--out", str(tmp_path / "again"), "--masks", data, "--steps", "3",
                 "--guidance", "2", "--seed", "5", "--workdir", wd]) == 0
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "again" / "sample_0000.png")))

    capsys.readouterr()
    code = main(["sample", "--model", summary["best_checkpoint"], "--num", "1", "--out", str(tmp_path / "x"),
                 "--masks", str(tmp_path / "missing"), "--workdir", wd])
    assert code != 0 and "manifest.json" in capsys.readouterr().err
