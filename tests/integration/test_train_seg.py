"""End to end on real Ray + real sqlite MLflow: prepare -> 2-worker train -> resume -> eval."""
import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from genseg import checkpoint as ck
from jobs.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = ["--set", "width=8", "--set", "crop=32x48", "--batch-size", "4", "--set", "image_every=1"]


def test_train_resume_register_and_eval_champion(ray_cluster, tmp_path, capsys):
    wd = str(tmp_path / "wd")
    data = str(tmp_path / "shards")
    assert main(["prepare", "--source", "synthetic", "--num", "24", "--size", "32x48", "--out", data,
                 "--workdir", wd]) == 0
    base = ["train", "seg", "--data", data, "--workers", "2", "--run-name", "r1", "--workdir", wd, *TINY]
    assert main([*base, "--epochs", "2"]) == 0
    assert main([*base, "--epochs", "3", "--json", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["resumed"] is True and summary["final_epoch"] == 2

    mlflow.set_tracking_uri(summary["tracking_uri"])
    client = MlflowClient()
    exp = client.get_experiment_by_name("genseg-seg")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1                                            # resumed, not a second run
    run = runs[0]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "epoch")]
    assert sorted(steps) == [0, 1, 2] and len(steps) == 3             # no restart at epoch 0
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)]
    assert losses[-1] < losses[0]
    assert run.data.params["arch"] == "fcn8s" and run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint", "best_checkpoint", "pictures", "config.json"} <= artifacts
    assert len(client.list_artifacts(run.info.run_id, "pictures")) == 3

    # the final checkpoint carries epoch and config; the registry has a champion
    final = ck.load(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="checkpoint",
                                                       dst_path=str(tmp_path / "dl")))
    assert final.epoch == 2 and final.config.width == 8 and final.config.num_classes == 7
    versions = client.search_model_versions("name='genseg-segmenter'")
    assert len(versions) == 2                      # one per training invocation that trained epochs
    champ = client.get_model_version_by_alias("genseg-segmenter", "champion")
    from genseg.data.shards import fingerprint

    # the champion records the data it was scored on, and competes only with versions on that data
    assert champ.tags["genseg.data_fingerprint"] == fingerprint(data, "val")[0]
    assert champ.tags["genseg.scored_on"] == "val" and champ.tags["genseg.score_name"] == "val_miou"

    out = tmp_path / "eval.json"
    capsys.readouterr()
    assert main(["eval", "seg", "--data", data, "--split", "val", "--json", str(out), "--workdir", wd]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["images"] == 5 and res["pixels"] == 5 * 32 * 48
    assert 0.0 <= res["miou"] <= 1.0 and set(res["per_class_iou"]) >= {"sky", "road"}
    assert "mIoU" in printed and f"{100 * res['miou']:.2f}" in printed
    # one lookup: the version evaluated is the one the alias named
    assert res["model"]["version"] == int(champ.version) and res["model"]["run_id"] == champ.run_id
    assert f"models:/genseg-segmenter@champion (version {champ.version}, run {champ.run_id})" in printed
    assert float(champ.tags["val_miou"]) == pytest.approx(
        max(m.value for m in client.get_metric_history(run.info.run_id, "val_miou")), abs=1e-5)


def test_eval_with_unknown_model_ref_fails_cleanly(ray_cluster, tmp_path, capsys):
    data = str(tmp_path / "shards")
    assert main(["prepare", "--source", "synthetic", "--num", "4", "--size", "16x16", "--out", data,
                 "--workdir", str(tmp_path)]) == 0
    code = main(["eval", "seg", "--model", "models:/genseg-segmenter@champion", "--data", data,
                 "--workdir", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert code == 1 and "not found" in err and "Traceback" not in err
    code = main(["train", "seg", "--data", data, "--set", "lr=fast", "--workdir", str(tmp_path)])
    assert code != 0 and "'lr' expects float" in capsys.readouterr().err


def test_resume_with_a_different_model_is_refused(ray_cluster, tmp_path, capsys):
    from genseg import checkpoint as ckl
    from genseg.config import SegConfig
    from genseg.models import build_segmenter

    run_dir = tmp_path / "wd" / "ray" / "r"
    cfg = SegConfig(num_classes=7, width=8)
    ckl.save(run_dir / "checkpoint_2026-01-01_00-00-00.000000", build_segmenter(cfg), cfg, epoch=0)
    data = str(tmp_path / "shards")
    assert main(["prepare", "--source", "synthetic", "--num", "8", "--size", "16x16", "--out", data,
                 "--workdir", str(tmp_path / "wd")]) == 0
    code = main(["train", "seg", "--data", data, "--run-name", "r", "--set", "width=16", "--batch-size", "2",
                 "--workdir", str(tmp_path / "wd")])
    err = capsys.readouterr().err
    assert code == 1 and "run 'r' exists with a different model (width: 8 -> 16)" in err
