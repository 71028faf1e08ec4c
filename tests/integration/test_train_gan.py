"""GAN on real Ray + sqlite MLflow: train 1 epoch -> resume -> register -> sample -> eval gen -> pyfunc."""
import json

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from genseg import checkpoint as ck
from jobs.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = ["--set", "g_channels=8", "--set", "d_channels=8", "--set", "z_dim=16", "--batch-size", "4",
        "--set", "sample_every=1", "--loss", "wgan-gp", "--set", "d_steps=2"]


def test_train_resume_register_sample_and_eval(ray_cluster, tmp_path, capsys):
    wd, data = str(tmp_path / "wd"), str(tmp_path / "shards")
    assert main(["prepare", "--source", "synthetic", "--num", "24", "--size", "16x24", "--val-fraction", "0.34",
                 "--out", data, "--workdir", wd]) == 0
    base = ["train", "gan", "--data", data, "--workers", "2", "--run-name", "g", "--workdir", wd, *TINY]
    assert main([*base, "--epochs", "1"]) == 0
    assert main([*base, "--epochs", "2", "--json", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["resumed"] and summary["final_epoch"] == 1 and summary["score"] == "val_fd_rand"

    mlflow.set_tracking_uri(summary["tracking_uri"])
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("genseg-gan").experiment_id])
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    for name in ("d_loss", "g_loss", "d_real", "d_fake", "gp", "val_fd_rand", "rand_recall", "rand_coverage"):
        history = client.get_metric_history(run_id, name)
        assert sorted(m.step for m in history) == [0, 1], name            # one history, no restart from 0
        assert all(np.isfinite(m.value) for m in history), name
    assert len(client.list_artifacts(run_id, "samples")) == 2
    champ = client.get_model_version_by_alias("genseg-gan", "champion")
    assert float(champ.tags["val_fd_rand"]) == pytest.approx(summary["best_score"], abs=1e-5)
    assert champ.tags["genseg.scored_on"] == "val (first 128 images)"       # FD at another n would not compare
    fds = [m.value for m in client.get_metric_history(run_id, "val_fd_rand")]
    assert summary["best_score"] == pytest.approx(min(fds), abs=1e-6)

    # the checkpoint holds both networks, the EMA and both optimizers; the resume carried them on
    final = sorted(p for p in (tmp_path / "wd" / "ray" / "g").glob("checkpoint_*") if p.is_dir())[-1]
    state = ck.load_train_state(final)
    assert set(state["optimizers"]) == {"generator", "discriminator"}
    assert all(len(s["state"]) > 0 for s in state["optimizers"].values())
    per_epoch = (16 // 2) // 4                                          # 16 train scenes, 2 workers, batch 4
    assert state["ema_updates"] == 2 * per_epoch                        # 2 epochs: not restarted at the resume
    assert ck.load_weights(final, "ema") is not None and ck.load_weights(final, "discriminator") is not None
    best = ck.load(summary["best_checkpoint"])
    assert type(best.config).__name__ == "GANConfig" and best.config.image_size == (16, 24)

    # sample through the generation interface, by the registry alias
    out = tmp_path / "samples"
    assert main(["sample", "--model", "models:/genseg-gan@champion", "--num", "3", "--out", str(out), "--masks", data,
                 "--seed", "5", "--workdir", wd]) == 0
    res = json.loads((out / "samples.json").read_text())
    assert res["kind"] == "gan" and res["conditioned"] and res["sampling"] == {"truncation": 0.0}
    first = np.asarray(Image.open(out / "sample_0000.png"))
    assert first.shape == (16, 24, 3)
    assert main(["sample", "--model", "models:/genseg-gan@champion", "--num", "3", "--out", str(tmp_path / "again"),
                 "--masks", data, "--seed", "5", "--workdir", wd]) == 0
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "again" / "sample_0000.png")))

    # eval gen takes the GAN as it takes a diffusion model, with the collapse diagnostics
    from genseg.config import SegConfig
    from genseg.models import build_segmenter

    seg_cfg = SegConfig(num_classes=7, width=8)
    seg_dir = ck.save(tmp_path / "seg", build_segmenter(seg_cfg), seg_cfg, epoch=0,
                      classes=json.loads((tmp_path / "shards" / "manifest.json").read_text())["classes"])
    gen_json = tmp_path / "gen.json"
    capsys.readouterr()
    assert main(["eval", "gen", "--model", "models:/genseg-gan@champion", "--segmenter", str(seg_dir), "--data", data,
                 "--num", "8", "--inpaint-num", "2", "--json", str(gen_json), "--workdir", wd]) == 0
    report = capsys.readouterr().out
    g = json.loads(gen_json.read_text())
    assert g["protocol"]["generator_kind"] == "gan" and g["protocol"]["sampling"] == "one forward pass"
    assert g["n"] == 8 and set(g["diversity"]) >= {"precision", "recall", "density", "coverage"}
    assert 0 <= g["diversity"]["coverage"] <= 1
    hist = g["class_histogram"]
    assert len(hist["samples"]) == 7 and sum(hist["samples"]) == pytest.approx(1.0)
    assert "diversity (k=5 NN balls" in report and "class pixels as segmented" in report
    assert np.isfinite(g["inpaint_psnr"])

    # MLflow's own loader: label maps in, images out
    model = mlflow.pyfunc.load_model("models:/genseg-gan@champion")
    images = model.predict(np.zeros((2, 16, 24), np.int64), params={"seed": 1})
    assert images.shape == (2, 16, 24, 3) and images.dtype == np.uint8
    truncated = model.predict(np.zeros((2, 16, 24), np.int64), params={"seed": 1, "truncation": 0.5})
    assert truncated.shape == images.shape and not np.array_equal(truncated, images)
