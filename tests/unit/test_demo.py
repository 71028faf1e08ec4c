"""``genseg demo`` drives the public CLI: these tests replace ``jobs.cli.main`` by a fake that
writes the JSON files the real commands write, and check what the demo asks for and reports."""
import json
from pathlib import Path

import pytest

from jobs import demo
from jobs.runtime import Runtime

pytestmark = pytest.mark.unit


def _opt(argv, flag):
    return argv[argv.index(flag) + 1] if flag in argv else None


class FakeCLI:
    """Records every ``cli.main(argv)`` and writes what the real command would write."""

    def __init__(self, fail=None):
        self.calls, self.fail, self.versions = [], fail, {"seg": 0, "diffusion": 0, "gan": 0}

    def __call__(self, argv):
        argv = [a for a in argv if a != "-v"]
        cmd = argv[0] if argv[0] not in ("train", "eval", "tune") else f"{argv[0]} {argv[1]}"
        self.calls.append((cmd, argv))
        if cmd == self.fail:
            return 1
        if cmd == "prepare":
            out = Path(_opt(argv, "--out"))
            out.mkdir(parents=True, exist_ok=True)
            num, frac = int(_opt(argv, "--num")), float(_opt(argv, "--val-fraction") or 0.2)
            val = round(num * frac)
            (out / "manifest.json").write_text(json.dumps({
                "num_classes": 7, "classes": {"names": list("abcdefg")}, "size": _opt(argv, "--size"),
                "splits": {"train": {"count": num - val}, "val": {"count": val}}}))
        elif cmd.startswith("train"):
            task = argv[1]
            self.versions[task] += 1
            name = {"seg": "genseg-segmenter", "diffusion": "genseg-diffusion", "gan": "genseg-gan"}[task]
            score = {"seg": "val_miou", "diffusion": "val_x0_mse", "gan": "val_fd_rand"}[task]
            Path(_opt(argv, "--json")).write_text(json.dumps({
                "best_score": 0.5, "best_epoch": 3, "score": score,
                "best_checkpoint": f"/runs/{_opt(argv, '--run-name')}/best", "mlflow_run_id": "r",
                "registered": {"name": name, "version": self.versions[task], "champion": True}}))
        elif cmd == "eval seg":
            Path(_opt(argv, "--json")).write_text(json.dumps({"miou": 0.6, "pixel_acc": 0.9, "images": 48}))
        elif cmd == "eval gen":
            n = int(_opt(argv, "--num"))
            Path(_opt(argv, "--json")).write_text(json.dumps({
                "n": n, "fd": 5.0, "fd_std": 1.0, "kid": 0.01, "kid_std": 0.005,
                "noise_floor": {"fd": 4.5, "fd_std": 1.0, "kid": 0.0, "n": n},
                "seg_miou_samples": 0.45, "seg_miou_real_ceiling": 0.5}))
        elif cmd == "tune diffusion":
            self.versions["diffusion"] += 1
            Path(_opt(argv, "--json")).write_text(json.dumps({
                "best_sampling": {"sampler": "ddim", "steps": 20, "guidance": 4.0},
                "registered": {"name": "genseg-diffusion", "version": self.versions["diffusion"], "champion": True}}))
        elif cmd == "sample":
            out = Path(_opt(argv, "--out"))
            out.mkdir(parents=True, exist_ok=True)
            (out / "samples.json").write_text(json.dumps({"grid": str(out / "grid.png"), "seconds_per_image": 0.002}))
        return 0


class FakeServe:
    """Stands in for the serving step (a real Serve app is tested in tests/integration/test_serve.py)."""

    def __init__(self):
        self.calls = []

    def __call__(self, rt, seg_ref, gen_ref, size, demo_dir, keep_serving, port=8000):
        self.calls.append({"segmenter": seg_ref, "generator": gen_ref, "size": size, "keep": keep_serving})
        return {"url": "http://127.0.0.1:8000/"}


@pytest.fixture(autouse=True)
def fake_serve(monkeypatch):
    fake = FakeServe()
    monkeypatch.setattr("jobs.demo.serve_and_call", fake)
    return fake


@pytest.fixture
def fake_cli(monkeypatch):
    fake = FakeCLI()
    monkeypatch.setattr("jobs.cli.main", fake)
    return fake


def _rt(tmp_path):
    return Runtime(workdir=tmp_path, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", ray_address=None)


def test_diffusion_size():
    assert demo.diffusion_size((64, 96)) == (32, 48)
    assert demo.diffusion_size((32, 48)) == (32, 48)
    assert demo.diffusion_size((128, 160)) == (32, 40)      # halved twice; already multiples of 4
    assert demo.diffusion_size((48, 64)) == (24, 32)
    assert demo.diffusion_size((40, 60)) == (20, 28)        # 20x30 -> multiples of 4 for 3 UNet levels


def test_default_size_scores_samples_with_a_segmenter_trained_at_their_resolution(fake_cli, fake_serve, tmp_path,
                                                                                   capsys):
    assert demo.run(_rt(tmp_path), epochs=6, num=240, size=(64, 96), diffusion_epochs=12) == 0
    cmds = [c for c, _ in fake_cli.calls]
    assert cmds == ["prepare", "train seg", "eval seg", "prepare", "train seg", "train diffusion", "sample",
                    "eval gen", "tune diffusion", "train gan", "sample", "eval gen"]
    calls = [argv for _, argv in fake_cli.calls]
    # the guidance search tunes the model just trained, scored by the same scorer on the same data
    tune = calls.pop(8)
    assert _opt(tune, "--stage") == "sampling" and _opt(tune, "--model") == "models:/genseg-diffusion/1"
    assert _opt(tune, "--segmenter") == "models:/genseg-segmenter/2" and _opt(tune, "--data") == _opt(calls[3], "--out")
    assert "guidance: [0.0, 2.0, 4.0]" in Path(_opt(tune, "--space")).read_text()
    small = calls[3]
    assert _opt(small, "--size") == "32x48" and _opt(small, "--val-fraction") == "0.4"
    # the scorer and the diffusion model learn from the 32x48 scenes; eval gen scores on them
    # with the scorer (registered version 2), not with the 64x96 segmenter (version 1)
    assert _opt(calls[4], "--data") == _opt(small, "--out") == _opt(calls[5], "--data") == _opt(calls[7], "--data")
    assert "image_size=32x48" in calls[5]
    assert _opt(calls[7], "--segmenter") == "models:/genseg-segmenter/2"
    assert _opt(calls[7], "--model") == _opt(calls[6], "--model") == "models:/genseg-diffusion/1"
    # 240 scenes at 40 % val = 96 val: 48 samples, and 48 other real images for the floor
    assert _opt(calls[7], "--num") == "48"
    assert _opt(calls[1], "--workers") == _opt(calls[5], "--workers") == "2"
    for argv in calls:                                        # every step runs in the user's workdir
        assert _opt(argv, "--workdir") == str(tmp_path)
    # the GAN learns from the same 32x48 scenes, samples the same label maps and is scored the same way
    assert _opt(calls[8], "--data") == _opt(small, "--out") and "image_size=32x48" in calls[8]
    assert _opt(calls[8], "--loss") == "hinge" and _opt(calls[8], "--workers") == "2"
    assert _opt(calls[9], "--model") == _opt(calls[10], "--model") == "models:/genseg-gan/1"
    assert _opt(calls[9], "--masks") == _opt(calls[6], "--masks")
    assert _opt(calls[10], "--segmenter") == "models:/genseg-segmenter/2" and _opt(calls[10], "--num") == "48"
    out = capsys.readouterr().out
    assert "90.0 % of it (n=48)" in out                       # 0.45 / 0.5
    assert "within 2 std of it (unresolved)" in out           # |5.0 - 4.5| < 2 sqrt(2)
    assert "[13/13]" in out and "done in" in out
    assert "tuned sampling {'sampler': 'ddim', 'steps': 20, 'guidance': 4.0}" in out
    # the last step serves the scorer (it shares the generator's size and label set) and the version the
    # guidance search registered (version 2: its tuned settings are the served defaults)
    assert fake_serve.calls == [{"segmenter": "models:/genseg-segmenter/2", "generator": "models:/genseg-diffusion/2",
                                 "size": (32, 48), "keep": False}]
    assert "served at http://127.0.0.1:8000/" in out


def test_size_at_the_diffusion_size_uses_one_segmenter(fake_cli, tmp_path):
    assert demo.run(_rt(tmp_path), epochs=2, num=100, size=(32, 48), diffusion_epochs=3) == 0
    cmds = [c for c, _ in fake_cli.calls]
    assert cmds == ["prepare", "train seg", "eval seg", "train diffusion", "sample", "eval gen", "tune diffusion",
                    "train gan", "sample", "eval gen"]
    calls = [argv for _, argv in fake_cli.calls]
    assert _opt(calls[0], "--val-fraction") == "0.4"
    assert _opt(calls[5], "--segmenter") == "models:/genseg-segmenter/1"
    assert _opt(calls[5], "--num") == "20"                     # 40 val scenes
    assert _opt(calls[3], "--epochs") == "3" and _opt(calls[1], "--epochs") == "2"


def test_a_failed_step_stops_the_demo_with_its_exit_code(monkeypatch, tmp_path, capsys):
    fake = FakeCLI(fail="train diffusion")
    monkeypatch.setattr("jobs.cli.main", fake)
    assert demo.run(_rt(tmp_path), size=(32, 48)) == 1
    assert [c for c, _ in fake.calls][-1] == "train diffusion"
    assert "demo step 'train diffusion' failed (exit 1)" in capsys.readouterr().out


def test_generation_story_states_n_spread_floor_and_verdict():
    g = {"n": 48, "fd": 12.0, "fd_std": 1.0, "kid": 0.02, "kid_std": None,
         "noise_floor": {"fd": 6.0, "fd_std": 1.0, "kid": -0.001, "n": 48},
         "seg_miou_samples": 0.4, "seg_miou_real_ceiling": 0.5}
    lines = demo.generation_story(g)
    assert lines[0] == ("segmenter mIoU on the samples 40.0 against 50.0 on the real images (the ceiling): "
                        "80.0 % of it (n=48)")
    assert lines[1].endswith("(n=48): above it by more than 2 std")
    assert lines[2] == "KID 0.0200; real-vs-real floor -0.0010"
    # a floor measured at another n is shown but not compared
    g["noise_floor"]["n"] = 24
    assert demo.generation_story(g)[1].endswith("real-vs-real floor 6.000 +- 1.000 (n=24)")


def test_side_by_side_pairs_label_diffusion_and_gan_samples(tmp_path):
    import numpy as np
    from PIL import Image

    d, g = tmp_path / "d", tmp_path / "g"
    d.mkdir()
    g.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 12, 3), 10 * i, np.uint8)).save(d / f"label_{i:04d}.png")
        Image.fromarray(np.full((8, 12, 3), 100, np.uint8)).save(d / f"sample_{i:04d}.png")
        Image.fromarray(np.full((8, 12, 3), 200, np.uint8)).save(g / f"sample_{i:04d}.png")
    out = demo.side_by_side(d, g, tmp_path / "both.png")
    pic = np.asarray(Image.open(out))
    # two columns of (label | diffusion | GAN) rows, 3 x 12 px wide each plus a 4 px gap, upscaled to >= 768
    factor = pic.shape[1] // (2 * 36 + 4)
    assert factor >= 10 and pic.shape[1] == factor * (2 * 36 + 4)
    assert pic[0, 12 * factor + 1, 0] == 100 and pic[0, 24 * factor + 1, 0] == 200      # diffusion, then GAN
    assert demo.side_by_side(tmp_path / "none", g, tmp_path / "x.png") is None


def test_a_guidance_search_that_keeps_the_models_settings_registers_nothing(monkeypatch, tmp_path, capsys):
    class KeepsOwn(FakeCLI):
        def __call__(self, argv):
            rc = super().__call__(argv)
            if argv[:2] == ["tune", "diffusion"]:
                Path(_opt(argv, "--json")).write_text(json.dumps({
                    "best_sampling": {"sampler": "ddim", "steps": 20, "guidance": 2.0}, "registered": None}))
            return rc

    fake = KeepsOwn()
    monkeypatch.setattr("jobs.cli.main", fake)
    serve = FakeServe()
    monkeypatch.setattr("jobs.demo.serve_and_call", serve)
    assert demo.run(_rt(tmp_path), size=(32, 48)) == 0
    out = capsys.readouterr().out
    assert "the model's own settings won, so nothing was registered" in out
    assert serve.calls[0]["generator"] == "models:/genseg-diffusion/1"     # the trained version, untuned
    # the GAN steps still run after it
    assert [c for c, _ in fake.calls][-3:] == ["train gan", "sample", "eval gen"]
