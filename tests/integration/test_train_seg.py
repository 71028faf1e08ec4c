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
    assert run.data.tags["genseg.job"] == "train seg"               # a search named r1 is another run
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


def _street_sequences(root):
    """Synthetic scenes saved as a folder source with CamVid-style names: three 'sequences' of 10 pairs."""
    import numpy as np
    from PIL import Image

    from genseg.data.synthetic import make_scene

    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    for s, seq in enumerate(("0001TP", "0006R0", "0016E5")):
        for i in range(10):
            image, mask = make_scene(s, i, 32, 48)
            Image.fromarray(image).save(images / f"{seq}_{i:06d}.png")
            Image.fromarray(mask.astype(np.uint8)).save(masks / f"{seq}_{i:06d}.png")
    return str(images), str(masks)


def test_holdout_split_select_on_it_and_evaluate_it(ray_cluster, tmp_path, capsys):
    """prepare --holdout -> train seg --select-on holdout (both splits scored every epoch; the best
    checkpoint and the champion on holdout) -> eval seg --split holdout, with flip TTA and pictures."""
    import numpy as np
    from PIL import Image

    wd, data = str(tmp_path / "wd"), str(tmp_path / "shards")
    images, masks = _street_sequences(tmp_path)
    assert main(["prepare", "--source", "folder", "--images", images, "--masks", masks, "--num-classes", "7",
                 "--holdout", "0006R0", "--val-fraction", "0.25", "--out", data, "--workdir", wd]) == 0
    m = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 15, "val": 5, "holdout": 10}
    from pipelines.shards import iter_split

    names = {s: {str(n) for b in iter_split(data, s, 64) for n in b["name"]} for s in ("train", "val", "holdout")}
    assert names["holdout"] == {f"0006R0_{i:06d}" for i in range(10)}
    assert not names["holdout"] & (names["train"] | names["val"])

    capsys.readouterr()
    assert main(["train", "seg", "--data", data, "--workers", "1", "--epochs", "4", "--select-on", "holdout",
                 "--run-name", "h", "--workdir", wd, "--json", str(tmp_path / "s.json"), *TINY, "--lr", "0.01",
                 "--set", "jitter=0.2", "--set", "gamma=0.2", "--set", "blur=0.2", "--set", "loss=ohem_dice",
                 "--set", "mix=classmix"]) == 0
    out = capsys.readouterr().out
    assert "holdout mIoU" in out and "registered" in out
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["score"] == "holdout_miou"
    client = MlflowClient(summary["tracking_uri"])
    params = client.get_run(summary["mlflow_run_id"]).data.params
    assert (params["mix"], params["mix_p"], params["loss"]) == ("classmix", "0.5", "ohem_dice")
    hist = {m.step: m.value for m in client.get_metric_history(summary["mlflow_run_id"], "holdout_miou")}
    val_hist = {m.step: m.value for m in client.get_metric_history(summary["mlflow_run_id"], "val_miou")}
    assert sorted(hist) == sorted(val_hist) == [0, 1, 2, 3]
    assert len(set(hist.values())) > 1, hist                           # it learned: the epochs differ
    assert hist[summary["best_epoch"]] == max(hist.values())          # chosen on holdout
    best_hist = [m.value for m in sorted(client.get_metric_history(summary["mlflow_run_id"], "best_miou"),
                                         key=lambda m: m.step)]
    assert best_hist == pytest.approx([max(hist[e] for e in range(i + 1)) for i in range(4)])   # holdout's, not val's
    assert summary["best_holdout_miou"] == pytest.approx(max(hist.values()))
    pics = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "pictures")}
    assert "pictures/holdout_epoch_000.png" in pics and "pictures/epoch_000.png" in pics
    champ = client.get_model_version_by_alias("genseg-segmenter", "champion")
    from genseg.data.shards import fingerprint

    assert champ.tags["genseg.scored_on"] == "holdout" and champ.tags["genseg.score_name"] == "holdout_miou"
    assert champ.tags["genseg.data_fingerprint"] == fingerprint(data, "holdout")[0]

    # eval seg --split holdout: the same figure as training's, then flip TTA (reported as such) and pictures
    plain, tta, pic = tmp_path / "plain.json", tmp_path / "tta.json", tmp_path / "holdout.png"
    assert main(["eval", "seg", "--model", summary["best_checkpoint"], "--data", data, "--split", "holdout",
                 "--json", str(plain), "--workdir", wd]) == 0
    p = json.loads(plain.read_text())
    assert p["images"] == 10 and p["miou"] == pytest.approx(summary["best_score"], abs=1e-9)
    assert p["protocol"]["tta"] == {"flip": False, "scales": [1.0]}
    capsys.readouterr()
    assert main(["eval", "seg", "--model", summary["best_checkpoint"], "--data", data, "--split", "holdout",
                 "--tta-flip", "--pictures", str(pic), "--pictures-num", "3", "--json", str(tta), "--workdir", wd]) == 0
    assert "test-time augmentation: flip on" in capsys.readouterr().out
    t = json.loads(tta.read_text())
    assert t["protocol"]["tta"] == {"flip": True, "scales": [1.0]}
    assert np.asarray(Image.open(pic)).shape == (3 * 32 + 2 * 2, 4 * 48 + 3 * 2, 3)

    # Tune searches the recipe with the holdout split as its objective, and registers the winner as scored there
    import yaml

    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"seg": {"lr": [0.01, 1e-9], "class_weights": ["inv-sqrt"]}}))
    assert main(["tune", "seg", "--data", data, "--space", str(tmp_path / "space.yaml"), "--epochs", "2",
                 "--set", "width=8", "--set", "batch_size=4", "--set", "crop=32x48", "--set", "select_on=holdout",
                 "--name", "hs", "--workdir", wd, "--json", str(tmp_path / "tune.json")]) == 0
    res = json.loads((tmp_path / "tune.json").read_text())
    trials = res["stages"]["seg"]["trials"]
    assert len(trials) == 2 and all("holdout_miou" in r["metrics"] for r in trials)
    assert res["stages"]["seg"]["best"]["metrics"]["best_miou"] == max(r["metrics"]["best_miou"] for r in trials)
    v = client.get_model_version("genseg-segmenter", str(res["registered"]["version"]))
    assert v.tags["genseg.scored_on"] == "holdout" and v.tags["genseg.score_name"] == "holdout_miou"

    (tmp_path / "bad_space.yaml").write_text(yaml.safe_dump({"seg": {"class_weights": [[1.0, 2.0], "inv-sqrt"]}}))
    # bad input, one line each: a sequence that is not there, a holdout that takes everything, a split
    # to select on that the shards lack
    for args, message in (
            (["prepare", "--source", "folder", "--images", images, "--masks", masks, "--num-classes", "7",
              "--holdout", "Seq05VD", "--out", str(tmp_path / "x")],
             "--holdout Seq05VD: no train image's name starts with 'Seq05VD' (their sequences: 0001TP, 0006R0, 0016E5)"),
            (["prepare", "--source", "folder", "--images", images, "--masks", masks, "--num-classes", "7",
              "--holdout", "0001TP,0006R0,0016E5", "--out", str(tmp_path / "x")],
             "would move every training image (30) into holdout"),
            (["train", "seg", "--data", str(tmp_path / "plain-shards"), "--select-on", "holdout", *TINY],
             "--select-on holdout: "),
            (["prepare", "--source", "synthetic", "--holdout", "scene", "--out", str(tmp_path / "x")],
             "--holdout applies to --source camvid and --source folder"),
            (["eval", "gen", "--data", data, "--tta-flip"], "--tta-flip applies to `eval seg`, not `eval gen`"),
            (["eval", "seg", "--data", data, "--split", "holdout", "--pictures", str(tmp_path / "x" / "p.jpg")],
             "give a path ending in .png"),
            (["eval", "seg", "--data", data, "--split", "holdout", "--pictures-num", "4"],
             "--pictures-num needs --pictures PNG"),
            # tune seg: the sampling search's flags are refused, not ignored (it would select on val)
            (["tune", "seg", "--data", data, "--split", "holdout"],
             "--split applies to the sampling search of `tune diffusion`, not `tune seg` (score on another split "
             "with --set select_on=SPLIT)"),
            (["train", "seg", "--data", data, "--class-weights", "1,1,1,1,1,1,nan", *TINY],
             "config field 'class_weights' needs finite weights >= 0, not all 0"),
            (["tune", "seg", "--data", data, "--space", str(tmp_path / "bad_space.yaml")],
             "class_weights' has 2 values but num_classes is 7")):
        if "plain-shards" in args[3] and not (tmp_path / "plain-shards").exists():
            assert main(["prepare", "--source", "synthetic", "--num", "12", "--size", "32x48", "--out",
                         str(tmp_path / "plain-shards"), "--workdir", wd]) == 0
        capsys.readouterr()
        assert main([*args, "--workdir", wd]) != 0
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as exit_:        # argparse's check: one line too
        main(["eval", "seg", "--data", data, "--split", "holdout", "--infer-scale", "nan", "--workdir", wd])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--infer-scale: scale must be a number in (0, 4]" in err
    assert len(err.strip().splitlines()) == 1, err


def test_champion_margin_keeps_a_champion_that_a_run_beats_by_less(ray_cluster, tmp_path, capsys):
    """`train seg --champion-margin M` reaches the registry: a champion at mIoU 0 on the same data and
    split is beaten by any trained model, but not by more than 0.9 after one tiny epoch, so it keeps the alias."""
    from genseg import tracking
    from genseg.config import SegConfig
    from genseg.data.shards import fingerprint
    from genseg.models import build_segmenter

    wd, data = tmp_path / "wd", str(tmp_path / "shards")
    assert main(["prepare", "--source", "synthetic", "--num", "12", "--size", "32x48", "--out", data,
                 "--workdir", str(wd)]) == 0
    uri = f"sqlite:///{wd / 'mlflow.db'}"
    tracking.setup(wd, uri)
    client = MlflowClient(uri)
    run = client.create_run(tracking.experiment_id("genseg-seg", wd))
    cfg = SegConfig(num_classes=7, width=8)
    tracking.save_pyfunc(ck.save(tmp_path / "zero", build_segmenter(cfg), cfg, epoch=0), tmp_path / "pyfunc",
                         "segmenter")
    client.log_artifacts(run.info.run_id, str(tmp_path / "pyfunc"), "model")
    zero = tracking.register(run.info.run_id, "model", "genseg-segmenter", tracking.Score("val_miou", 0.0),
                             data_fingerprint=fingerprint(data, "val")[0], scored_on="val", tracking_uri=uri)
    assert zero["champion"]

    capsys.readouterr()
    assert main(["train", "seg", "--data", data, "--workers", "1", "--epochs", "1", "--run-name", "m",
                 "--workdir", str(wd), "--champion-margin", "0.9", "--json", str(tmp_path / "m.json"), *TINY]) == 0
    reg = json.loads((tmp_path / "m.json").read_text())["registered"]
    assert 0 < reg["score"] < 0.9 and not reg["champion"] and reg["previous_champion"] == zero["version"]
    assert f"beats the champion's 0 by {reg['score']:.6g}, not by more than the margin 0.9" in reg["reason"]
    assert "the champion stays version 1" in capsys.readouterr().out
    assert int(client.get_model_version_by_alias("genseg-segmenter", "champion").version) == zero["version"]
