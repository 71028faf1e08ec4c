"""Latent diffusion on real Ray + sqlite MLflow: encode shards with an autoencoder (Ray Data actors) ->
the latents decode to the images as the autoencoder does -> train diffusion --latent (encoded once,
cached) -> resume -> register -> sample at full resolution -> eval gen -> edit."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from genseg import checkpoint as ck
from genseg.config import SegConfig, VAEConfig
from genseg.data.shards import decode_batch
from genseg.diffusion.conditioning import pool_labels
from genseg.diffusion.ema import EMA
from genseg.loading import load
from genseg.models import build_segmenter
from genseg.models.vae import build_vae
from jobs.cli import main
from pipelines.shards import iter_split

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = ["--set", "channels=8,16", "--batch-size", "4", "--set", "timesteps=50", "--set", "sample_steps=3",
        "--set", "sample_every=1"]


def autoencoder(root, classes) -> str:
    """A small factor-4 autoencoder checkpoint (untrained weights, EMA beside them, a latent scale)."""
    torch.manual_seed(0)
    cfg = VAEConfig(channels=(8, 16, 16), norm_groups=4, latent_channels=3, image_size=(16, 24))
    net = build_vae(cfg)
    ema = EMA(net, 0.5)
    return str(ck.save(root / "vae", net, cfg, epoch=0, classes=classes, extra_meta={"latent_scale": 1.7},
                       extra_weights={"ema": ema.model}))


def test_encode_train_resume_sample_eval_and_edit(ray_cluster, tmp_path, capsys):
    wd, data, lat = str(tmp_path / "wd"), str(tmp_path / "shards"), str(tmp_path / "latents")
    assert main(["prepare", "--source", "synthetic", "--num", "12", "--size", "16x24", "--out", data,
                 "--workdir", wd]) == 0
    classes = json.loads((tmp_path / "shards" / "manifest.json").read_text())["classes"]
    vae_dir = autoencoder(tmp_path, classes)

    # encode: latent shards whose latents decode as the autoencoder decodes the images
    assert main(["encode", "--data", data, "--vae", vae_dir, "--out", lat, "--workdir", wd]) == 0
    m = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert m["codec"] == "latent" and m["size"] == [4, 6] and m["latent"]["factor"] == 4
    assert m["latent"]["channels"] == 3 and m["latent"]["scale"] == pytest.approx(1.7)
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 10, "val": 2}
    vae = load(vae_dir, expect="vae")
    pixels = {str(n): pair for b in iter_split(data, "train", 16) for n, pair in zip(b["name"], decode_batch(b))}
    for b in iter_split(lat, "train", 16):
        for name, (z, grid) in zip(b["name"], decode_batch(b)):
            img, mask = pixels[str(name)]
            want = vae.encode_images([img])[0]
            # float16 storage: the latents agree to its precision, and decode to the same image within 2 levels
            assert torch.allclose(torch.from_numpy(z), want, atol=2e-3 * float(want.abs().max()) + 1e-3)
            diff = np.abs(vae.decode_images(torch.from_numpy(z)[None]).astype(int) -
                          vae.decode_images(want[None]).astype(int))
            assert diff.max() <= 2
            assert np.array_equal(grid, pool_labels(torch.from_numpy(mask.astype(np.int64))[None], 4, 7)[0].numpy())

    # train on the latents: the shards are encoded once into the workdir cache, and reused
    capsys.readouterr()
    base = ["train", "diffusion", "--data", data, "--latent", vae_dir, "--workers", "2", "--run-name", "ld",
            "--workdir", wd, *TINY]
    assert main([*base, "--epochs", "1"]) == 0
    assert "(once; later runs reuse it)" in capsys.readouterr().out
    assert main([*base, "--epochs", "2", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "(cached)" in out and "registered genseg-latent-diffusion version" in out
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["resumed"] and summary["final_epoch"] == 1
    best = ck.load(summary["best_checkpoint"])
    assert best.config.latent_channels == 3 and best.config.latent_factor == 4 and best.config.image_size == (4, 6)
    assert best.meta["vae"]["vae_digest"] == m["latent"]["vae_digest"]
    assert ck.load_weights(summary["best_checkpoint"], "vae") is not None        # the decoder travels with it

    # sample through the generation interface: full resolution, seeded
    ref = "models:/genseg-latent-diffusion@champion"
    sdir = tmp_path / "samples"
    assert main(["sample", "--model", ref, "--num", "3", "--out", str(sdir), "--masks", data, "--seed", "5",
                 "--workdir", wd]) == 0
    res = json.loads((sdir / "samples.json").read_text())
    assert res["kind"] == "diffusion" and res["size"] == [16, 24] and res["conditioned"]
    first = np.asarray(Image.open(sdir / "sample_0000.png"))
    assert first.shape == (16, 24, 3)
    assert main(["sample", "--model", ref, "--num", "3", "--out", str(tmp_path / "again"), "--masks", data,
                 "--seed", "5", "--workdir", wd]) == 0
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "again" / "sample_0000.png")))

    # eval gen and edit take it as they take a pixel model
    seg_cfg = SegConfig(num_classes=7, width=8)
    seg_dir = ck.save(tmp_path / "seg", build_segmenter(seg_cfg), seg_cfg, epoch=0, classes=classes)
    gen_json = tmp_path / "gen.json"
    assert main(["eval", "gen", "--model", ref, "--segmenter", str(seg_dir), "--data", data, "--num", "4",
                 "--inpaint-num", "2", "--json", str(gen_json), "--workdir", wd]) == 0
    g = json.loads(gen_json.read_text())
    assert g["protocol"]["size"] == [16, 24] and np.isfinite(g["fd"]) and np.isfinite(g["inpaint_psnr"])
    assert g["inpaint_boundary"] > 0 and g["inpaint_boundary_real"] > 0

    # Tune's sampling search takes it too, and the winner stays in the latent model's registry
    import yaml

    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"sampling": {"guidance": [0, 2], "sampler": ["ddim"],
                                                                      "steps": [2]}}))
    assert main(["tune", "diffusion", "--stage", "sampling", "--model", ref, "--data", data, "--space",
                 str(tmp_path / "space.yaml"), "--segmenter", str(seg_dir), "--num", "4", "--batch-size", "4",
                 "--name", "lt", "--workdir", wd, "--json", str(tmp_path / "tune.json")]) == 0
    t = json.loads((tmp_path / "tune.json").read_text())
    assert sorted(r["params"]["guidance"] for r in t["stages"]["sampling"]["trials"]) == [0, 2]
    assert all(np.isfinite(r["metrics"]["fd"]) for r in t["stages"]["sampling"]["trials"])
    if t["registered"] is not None:
        from mlflow.tracking import MlflowClient

        v = MlflowClient(f"sqlite:///{tmp_path / 'wd' / 'mlflow.db'}").get_model_version(
            "genseg-latent-diffusion", str(t["registered"]["version"]))
        assert json.loads(v.tags["genseg.sampling"]) == t["best_sampling"]
        assert v.tags.get("genseg.tune") == "lt"
    else:                       # no trial beat the model's own settings: nothing new is registered
        assert t["stages"]["sampling"]["chosen"]["own_settings_kept"]

    from genseg.data.synthetic import make_scene

    image, _ = make_scene(0, 99, 32, 48)
    Image.fromarray(image).save(tmp_path / "in.png")
    edited = tmp_path / "edit" / "out.png"
    labels = load(seg_dir, expect="segmenter").segment(image)
    present = [classes["names"][c] for c in np.unique(labels)]     # what the untrained segmenter sees
    assert main(["edit", "--model", ref, "--segmenter", str(seg_dir), "--image", str(tmp_path / "in.png"),
                 "--remove", present[0], "--out", str(edited), "--workdir", wd]) == 0
    out_img = np.asarray(Image.open(edited))
    region = np.asarray(Image.open(edited.with_suffix(".mask.png"))) > 0
    assert out_img.shape == image.shape and region.any()
    assert not np.array_equal(out_img[region], image[region])      # regenerated inside (decoded latents)
    assert np.array_equal(out_img[~region], image[~region])        # untouched outside the edited region

    # outpainting: the canvas grows by whole latent cells; the original comes back bit for bit
    grown = tmp_path / "edit" / "grown.png"
    assert main(["edit", "--model", ref, "--segmenter", str(seg_dir), "--image", str(tmp_path / "in.png"),
                 "--extend", "left=8,top=4", "--out", str(grown), "--workdir", wd]) == 0
    canvas = np.asarray(Image.open(grown))
    assert canvas.shape == (36, 56, 3) and np.array_equal(canvas[4:, 8:], image)
    summary = json.loads(grown.with_suffix(".json").read_text())
    assert summary["extend"] == {"left": 8, "top": 4} and summary["edited_pixels"] == 36 * 56 - 32 * 48
    assert np.isfinite(summary["boundary"]["ratio"])

    # bad input: one line each
    capsys.readouterr()
    assert main(["edit", "--model", ref, "--segmenter", str(seg_dir), "--image", str(tmp_path / "in.png"),
                 "--extend", "left=6", "--out", str(tmp_path / "edit" / "x.png"), "--workdir", wd]) != 0
    err = capsys.readouterr().err
    assert "left=6 is not a multiple of the latent model's autoencoder factor 4" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["encode", "--data", lat, "--vae", vae_dir, "--out", str(tmp_path / "x"), "--workdir", wd]) != 0
    assert "already holds latents" in capsys.readouterr().err
    assert main(["encode", "--data", data, "--vae", vae_dir, "--size", "18x24", "--out", str(tmp_path / "x"),
                 "--workdir", wd]) != 0
    err = capsys.readouterr().err
    assert "multiples of 4" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "seg", "--data", data, "--latent", vae_dir, "--workdir", wd]) != 0
    assert "--latent applies to `train diffusion`" in capsys.readouterr().err
