"""The latent-diffusion autoencoder on real Ray + sqlite MLflow: train 1 epoch -> resume -> register ->
load the champion by its alias -> encode and decode."""
import json

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from genseg import checkpoint as ck
from genseg import tracking
from genseg.loading import load
from jobs.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = ["--set", "channels=8,16,16", "--set", "norm_groups=4", "--set", "latent_channels=3", "--batch-size", "4",
        "--set", "crop=8x16", "--set", "image_every=1", "--lr", "0.003", "--set", "disc_weight=0.01"]


def test_train_resume_register_and_load_the_champion(ray_cluster, tmp_path, capsys):
    wd, data = str(tmp_path / "wd"), str(tmp_path / "shards")
    assert main(["prepare", "--source", "synthetic", "--num", "24", "--size", "16x24", "--val-fraction", "0.34",
                 "--out", data, "--workdir", wd]) == 0
    base = ["train", "vae", "--data", data, "--workers", "2", "--run-name", "v", "--workdir", wd, *TINY]
    assert main([*base, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main([*base, "--epochs", "3", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["resumed"] and summary["final_epoch"] == 2 and summary["score"] == "val_psnr"
    assert "best val_psnr" in out and " dB (epoch" in out and "registered genseg-vae version 2" in out

    mlflow.set_tracking_uri(summary["tracking_uri"])
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("genseg-vae").experiment_id])
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    for name in ("loss", "l1", "kl", "d_loss", "val_psnr", "val_ssim", "latent_std", "latent_scale"):
        history = client.get_metric_history(run_id, name)
        assert sorted(m.step for m in history) == [0, 1, 2], name        # one history, no restart from 0
        assert all(np.isfinite(m.value) for m in history), name
    l1 = [m.value for m in sorted(client.get_metric_history(run_id, "l1"), key=lambda m: m.step)]
    assert l1[-1] < l1[0]                                                   # it learns
    assert len(client.list_artifacts(run_id, "reconstructions")) == 3
    psnrs = [m.value for m in client.get_metric_history(run_id, "val_psnr")]
    assert summary["best_score"] == pytest.approx(max(psnrs), abs=1e-6)

    # the checkpoint holds the autoencoder, its EMA, the discriminator and both optimizers
    final = sorted(p for p in (tmp_path / "wd" / "ray" / "v").glob("checkpoint_*") if p.is_dir())[-1]
    state = ck.load_train_state(final)
    assert set(state["optimizers"]) == {"model", "discriminator"}
    assert state["ema_updates"] == 3 * ((16 // 2) // 4)                 # 3 epochs, not restarted at the resume
    assert ck.load_weights(final, "ema") is not None and ck.load_weights(final, "discriminator") is not None

    # the champion, by its alias, encodes to a 4x smaller grid and decodes back to the image size
    resolved = tracking.resolve("models:/genseg-vae@champion", summary["tracking_uri"], tmp_path / "cache")
    vae = load(resolved, expect="vae")
    assert vae.factor == 4 and vae.version == 2                   # the resumed run beat the 1-epoch one
    best = ck.load(summary["best_checkpoint"])
    assert vae.scale == pytest.approx(best.meta["latent_scale"]) and vae.scale > 0
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, 3, 4, 6)
    assert vae.decode(z).shape == (2, 3, 16, 24)
