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
    assert summary["resumed"] and summary["final_epoch"] == 1 and summary["score"] == "val_x0_mse"

    mlflow.set_tracking_uri(summary["tracking_uri"])
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("genseg-diffusion").experiment_id])
    assert len(runs) == 1
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss"))
    assert steps == [0, 1]
    assert len(client.list_artifacts(runs[0].info.run_id, "samples")) == 2
    champ = client.get_model_version_by_alias("genseg-diffusion", "champion")
    assert float(champ.tags["val_x0_mse"]) == pytest.approx(summary["best_score"], abs=1e-5)
    history = [m.value for m in client.get_metric_history(runs[0].info.run_id, "val_x0_mse")]
    assert summary["best_score"] == pytest.approx(min(history), abs=1e-6)     # the best epoch, not the last
    # the model's sampling settings travel with the registry version
    assert json.loads(champ.tags["genseg.sampling"]) == {"sampler": "ddim", "steps": 3, "guidance": 2.0}

    best = ck.load(summary["best_checkpoint"])
    assert best.config.cond == "mask" and best.config.image_size == (16, 24) and best.config.num_classes == 7
    assert ck.load_weights(summary["best_checkpoint"], "ema") is not None

    out = tmp_path / "samples"
    assert main(["sample", "--num", "3", "--out", str(out), "--masks", data, "--steps", "3", "--guidance", "2",
                 "--seed", "5", "--workdir", wd]) == 0
    res = json.loads((out / "samples.json").read_text())
    assert res["num"] == 3 and res["conditioned"] and res["sampling"]["guidance"] == 2.0 and res["weights"] == "ema"
    assert res["model"]["version"] == int(champ.version)
    first = np.asarray(Image.open(out / "sample_0000.png"))
    assert first.shape == (16, 24, 3) and (out / "label_0002.png").exists()
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape[1] == 8 * 2 * (2 * 24)      # two (label | sample) pairs side by side, upscaled x8 to 768
    # same seed -> same pixels
    assert main(["sample", "--num", "3", "--out", str(tmp_path / "again"), "--masks", data, "--steps", "3",
                 "--guidance", "2", "--seed", "5", "--workdir", wd]) == 0
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "again" / "sample_0000.png")))

    capsys.readouterr()
    code = main(["sample", "--model", summary["best_checkpoint"], "--num", "1", "--out", str(tmp_path / "x"),
                 "--masks", str(tmp_path / "missing"), "--workdir", wd])
    assert code != 0 and f"{tmp_path / 'missing'} does not exist" in capsys.readouterr().err

    # eval gen and edit against a (small, untrained) segmenter checkpoint with the same label set
    from genseg.config import SegConfig
    from genseg.models import build_segmenter

    seg_cfg = SegConfig(num_classes=7, width=8)
    seg_dir = ck.save(tmp_path / "seg", build_segmenter(seg_cfg), seg_cfg, epoch=0,
                      classes=json.loads((tmp_path / "shards" / "manifest.json").read_text())["classes"])
    gen_json = tmp_path / "gen.json"
    assert main(["eval", "gen", "--segmenter", str(seg_dir), "--data", data, "--num", "4",
                 "--inpaint-num", "2", "--json", str(gen_json), "--workdir", wd]) == 0
    g = json.loads(gen_json.read_text())
    assert g["n"] == 2 and g["protocol"]["samples"] == 2 and g["protocol"]["size"] == [16, 24]   # val has 2 scenes
    assert g["noise_floor"] is None              # 2 real images cannot give two real sets to compare
    assert g["protocol"]["steps"] == 3 and g["protocol"]["sampler"] == "ddim"   # the model's own settings
    # the default model is the registry champion; the protocol names the version it resolved to
    assert g["protocol"]["generator"] == f"models:/genseg-diffusion@champion (version {champ.version}, run {champ.run_id})"
    assert g["protocol"]["segmenter"] == str(seg_dir)
    assert np.isfinite(g["inpaint_psnr"]) and g["inpaint_ssim"] is None   # no 11x11 SSIM window fits an 8x12 hole

    from genseg.data.synthetic import make_scene

    image, _ = make_scene(0, 99, 40, 60)
    Image.fromarray(image).save(tmp_path / "in.png")
    edited = tmp_path / "edit" / "out.png"
    assert main(["edit", "--segmenter", str(seg_dir), "--image", str(tmp_path / "in.png"), "--remove", "sky,road",
                 "--out", str(edited), "--steps", "3", "--workdir", wd]) == 0
    out_img = np.asarray(Image.open(edited))
    region = np.asarray(Image.open(edited.with_suffix(".mask.png"))) > 0
    assert out_img.shape == image.shape
    assert np.array_equal(out_img[~region], image[~region])        # untouched outside the edited region
    capsys.readouterr()
    assert main(["edit", "--segmenter", str(seg_dir), "--image", str(tmp_path / "in.png"), "--remove", "unicorn",
                 "--out", str(edited), "--workdir", wd]) != 0
    assert "unknown class 'unicorn'" in capsys.readouterr().err
