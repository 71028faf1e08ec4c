"""Every bad input is one clear line: through the real CLI entry point, each case must exit
non-zero, name the problem, print no traceback, and leave everything already written as it was.

Cases that fail before Ray starts run as subprocesses (an honest "no traceback" check: nothing
catches for us); cases that need Ray to find the problem run in-process on the session
``ray_cluster``.  To add a case, add a ``Case`` row to ``CASES``: its ``setup`` builds inputs in
the case's own directory and returns the argv (``{d}`` and ``{shards}`` are filled in).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from genseg.data.classes import SYNTHETIC
from genseg.data.shards import encode_row

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ inputs the cases start from

def write_shards(d: Path, splits: dict[str, int] | None = None, size=(16, 24), ignore_split: str | None = None,
                 per_split_pixels: bool = True) -> Path:
    """A small genseg shard directory written directly (no Ray): ``splits`` rows per split, masks
    of random classes, or all 255 in ``ignore_split``.  ``per_split_pixels=False`` writes the
    manifest of shards prepared before manifests counted pixels per split."""
    rng = np.random.default_rng(0)
    k = SYNTHETIC.num_classes
    entries, hist_all = {}, np.zeros(256, np.int64)
    for split, n in (splits or {"train": 8, "val": 4}).items():
        rows, hist = [], np.zeros(256, np.int64)
        for i in range(n):
            mask = np.full(size, 255, np.uint8) if split == ignore_split else rng.integers(0, k, size, dtype=np.uint8)
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            rows.append(encode_row(f"{split}_{i:03d}", image, mask))
            hist += np.bincount(mask.reshape(-1), minlength=256)
        (d / split).mkdir(parents=True)
        schema = pa.schema([("name", pa.string()), ("height", pa.int64()), ("width", pa.int64()),
                            ("image", pa.binary()), ("mask", pa.binary())])
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), d / split / "part-0.parquet")
        entries[split] = {"count": n}
        if per_split_pixels:
            entries[split].update(class_pixels=hist[:k].tolist(), ignored_pixels=int(hist[255]))
        hist_all += hist
    manifest = {"format": "genseg-shards/1", "classes": SYNTHETIC.to_dict(), "num_classes": k, "ignore_index": 255,
                "splits": entries, "sizes": [list(size)], "size": list(size), "class_pixels": hist_all[:k].tolist(),
                "ignored_pixels": int(hist_all[255]), "skipped": [], "source": {"source": "test"}, "seconds": 0.0}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def as_in_a_terminal() -> None:
    """``preexec_fn``: SIGINT at its default, as for a command typed in a terminal.  A test run
    started in the background of a script (``make test &``, some CI runners) inherits SIGINT
    ignored, and Python then never turns a Ctrl-C into KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def truncate_first(d: Path, split: str) -> Path:
    f = sorted((d / split).glob("*.parquet"))[0]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f


def empty_split(d: Path, split: str) -> None:
    for f in (d / split).glob("*.parquet"):
        f.unlink()


def zero_rows(d: Path, split: str) -> None:
    """The split's file holds a valid table with no rows, and the manifest agrees."""
    f = sorted((d / split).glob("*.parquet"))[0]
    pq.write_table(pq.read_table(f).slice(0, 0), f)
    m = json.loads((d / "manifest.json").read_text())
    m["splits"][split] = {"count": 0, "class_pixels": [0] * m["num_classes"], "ignored_pixels": 0}
    (d / "manifest.json").write_text(json.dumps(m))


def binary_masks(d: Path) -> tuple[Path, Path]:
    """Foreground masks stored as 0/255 PNGs, the way most annotation tools export them."""
    img, msk = d / "img", d / "msk"
    img.mkdir()
    msk.mkdir()
    for i in range(4):
        mask = np.zeros((16, 16), np.uint8)
        mask[4:12, 4 + i:10 + i] = 255
        Image.fromarray(np.stack([mask] * 3, -1)).save(img / f"p{i}.png")
        Image.fromarray(mask).save(msk / f"p{i}.png")
    return img, msk


def seg_checkpoint(d: Path) -> Path:
    from genseg import checkpoint as ck
    from genseg.config import SegConfig
    from genseg.models import build_segmenter

    cfg = SegConfig(num_classes=SYNTHETIC.num_classes, width=8)
    return ck.save(d / "seg", build_segmenter(cfg), cfg, epoch=0, classes=SYNTHETIC.to_dict())


def diffusion_checkpoint(d: Path, cond: str = "mask") -> Path:
    from genseg import checkpoint as ck
    from genseg.config import DiffusionConfig
    from genseg.models.unet import build_diffusion_model

    cfg = DiffusionConfig(cond=cond, num_classes=SYNTHETIC.num_classes, channels=(8, 16), image_size=(16, 24),
                          timesteps=50, sample_steps=2)
    return ck.save(d / f"diff-{cond}", build_diffusion_model(cfg), cfg, epoch=0, classes=SYNTHETIC.to_dict())


def gan_checkpoint(d: Path) -> Path:
    from genseg import checkpoint as ck
    from genseg.config import GANConfig
    from genseg.models.dcgan import build_generator

    cfg = GANConfig(num_classes=SYNTHETIC.num_classes, image_size=(16, 24), g_channels=8, d_channels=8, z_dim=8)
    return ck.save(d / "gan", build_generator(cfg), cfg, epoch=0, classes=SYNTHETIC.to_dict())


def truncated(make: Callable[[Path], Path], name: str):
    def build(d: Path) -> Path:
        ckpt = make(d)
        f = ckpt / name
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return ckpt
    return build


def huge_png(d: Path) -> Path:
    """A 5000x5000 PNG (1-bit, so the file is small): refused before it is decoded."""
    Image.new("1", (5000, 5000)).save(d / "huge.png")
    return d / "huge.png"


def small_png(d: Path) -> Path:
    from genseg.data.synthetic import make_scene

    Image.fromarray(make_scene(0, 1, 24, 32)[0]).save(d / "in.png")
    return d / "in.png"


def sample(model: Callable[[Path], Path], *extra: str):
    return lambda d: ["sample", "--model", str(model(d)), "--num", "1", "--out", str(d / "s"), *extra]


def edit(*extra: str, image: Callable[[Path], Path] = small_png):
    return lambda d: ["edit", "--model", str(diffusion_checkpoint(d)), "--segmenter", str(seg_checkpoint(d)),
                      "--image", str(image(d)), "--out", str(d / "e.png"), *extra]


# ------------------------------------------------------------------ the table

@dataclass
class Case:
    id: str
    setup: Callable[[Path], list[str]]   # builds inputs under the case dir, returns argv
    expect: str                          # a substring of the one stderr line ({d} = the case dir)
    ray: bool = False                    # needs the session Ray: run in-process
    marks: tuple = ()
    code: int | None = None              # exact exit code, when it matters (else any non-zero)
    hold_run: str | None = None          # hold this run name's lock in the test process meanwhile
    env: dict = field(default_factory=dict)


def synth(*extra: str):
    return lambda d: ["prepare", "--source", "synthetic", "--num", "6", "--size", "16x16", "--out", str(d / "out"),
                      *extra]


def train(data: Callable[[Path], Path], *extra: str, task: str = "seg"):
    return lambda d: ["train", task, "--data", str(data(d)), "--workers", "1", "--epochs", "1", *extra]


def eval_seg(data: Callable[[Path], Path], *extra: str):
    return lambda d: ["eval", "seg", "--data", str(data(d)), *extra]


def shards(**kw):
    return lambda d: write_shards(d / "shards", **kw)


def then(make: Callable[[Path], Path], change: Callable[[Path], object]):
    def build(d: Path) -> Path:
        out = make(d)
        change(out)
        return out
    return build


def thesis(d: Path) -> list[str]:
    (d / "out").mkdir()
    (d / "out" / "thesis.txt").write_text("three years of work")
    return synth()(d)


def out_is_a_file(d: Path) -> list[str]:
    (d / "out").write_text("not a directory")
    return synth()(d)


def shards_plus_notes(d: Path) -> list[str]:
    write_shards(d / "out")
    (d / "out" / "notes.txt").write_text("mine")
    return synth()(d)


def folder(*extra: str):
    def build(d: Path) -> list[str]:
        img, msk = binary_masks(d)
        return ["prepare", "--source", "folder", "--images", str(img), "--masks", str(msk), "--out", str(d / "out"),
                *extra]
    return build


def tune_started(d: Path) -> list[str]:
    """A search 's' started (its settings recorded, Tune's experiment begun) with the default one trial
    at a time; the argv reruns it with --max-concurrent 2."""
    from types import SimpleNamespace

    from jobs.cli import build_parser, tune_options
    from jobs.tune import _record_stage

    first = ["tune", "seg", "--data", str(write_shards(d / "shards")), "--name", "s"]
    _record_stage(tune_options(build_parser().parse_args(first)), SimpleNamespace(workdir=d / "wd"), "seg", {})
    (d / "wd" / "tune" / "s" / "seg").mkdir(parents=True)
    return [*first, "--max-concurrent", "2"]


CASES = [
    # prepare: flags
    Case("prepare-val-fraction-above-1", synth("--val-fraction", "1.5"), "--val-fraction must be at least 0 and below 1"),
    Case("prepare-val-fraction-negative", synth("--val-fraction", "-0.2"), "--val-fraction must be at least 0"),
    Case("prepare-num-0", synth("--num", "0"), "--num must be at least 2"),
    Case("prepare-num-negative", lambda d: synth()(d)[:3] + ["--num", "-4", "--out", str(d / "out")],
         "--num must be at least 2"),
    Case("prepare-binary-masks-not-folder", synth("--binary-masks"), "--binary-masks applies to --source folder"),
    Case("prepare-usage-is-one-line", lambda d: ["prepare", "--out", str(d / "out")],
         "the following arguments are required: --source", code=2),
    # prepare: an --out that holds a user's files is never replaced
    Case("prepare-out-not-shards", thesis, "{d}/out is a non-empty directory that is not a genseg shard directory"),
    Case("prepare-out-shards-plus-user-file", shards_plus_notes, "also holds {d}/out/notes.txt"),
    Case("prepare-out-is-a-file", out_is_a_file, "{d}/out exists and is not a directory"),
    # prepare: 0/255 foreground masks would silently lose their foreground
    Case("prepare-binary-0-255-masks", folder(), "hold only 0 and 255; 255 is the ignore index", ray=True),
    # Ray addresses: one line at once, not minutes of retries
    Case("prepare-unreachable-ray", synth("--ray-address", "127.0.0.1:9"), "127.0.0.1:9 does not answer"),
    Case("train-unreachable-ray", train(shards(), "--ray-address", "127.0.0.1:9"), "127.0.0.1:9 does not answer"),
    Case("prepare-dashboard-port-not-a-port", synth(), "GENSEG_DASHBOARD_PORT='eighty' is not a TCP port number",
         env={"GENSEG_DASHBOARD_PORT": "eighty"}),
    Case("train-dashboard-url-as-ray-address", train(shards(), "--ray-address", "http://127.0.0.1:8265"),
         "is a dashboard address"),
    # train: data checked before Ray starts
    Case("train-missing-data", train(lambda d: d / "nope"), "shard directory {d}/nope does not exist"),
    Case("train-data-without-manifest", train(lambda d: (d / "imgs").mkdir() or d / "imgs"),
         "{d}/imgs holds no manifest.json"),
    Case("train-truncated-shard", train(then(shards(), lambda s: truncate_first(s, "train"))),
         "{d}/shards/train/part-0.parquet: corrupted shard file"),
    Case("train-empty-split", train(then(shards(), lambda s: empty_split(s, "val"))),
         "split 'val' of {d}/shards is empty"),
    Case("train-zero-rows", train(then(shards(), lambda s: zero_rows(s, "val"))), "split 'val' of {d}/shards has 0 rows"),
    Case("train-all-ignored", train(shards(ignore_split="val")), "every mask pixel of split 'val'"),
    Case("train-bad-run-name", train(shards(), "--run-name", "../up"), "--run-name '../up'"),
    Case("train-negative-champion-margin", train(shards(), "--champion-margin=-0.01"),
         "--champion-margin must be a finite number >= 0, got '-0.01'", code=2),
    Case("train-seg-champion-margin-in-points", train(shards(), "--champion-margin", "1.5"),
         "--champion-margin 1.5 can never be cleared: a segmenter's mIoU is a fraction from 0 to 1, so 1.5 points "
         "is 0.015"),
    Case("tune-trials-leave-no-cpu-for-ray-data",
         lambda d: ["tune", "seg", "--data", str(shards()(d)), "--max-concurrent", "3"],
         "--max-concurrent 3: 3 training trial(s) at once of 1 worker(s) x 1 CPU leave 0.97 of Ray's 4 CPUs for "
         "Ray Data", ray=True),
    Case("train-workers-leave-no-cpu-for-ray-data", train(shards(), "--workers", "4", "--batch-size", "2"),
         "4 worker(s) x 1 CPU leave 0.00 of Ray's 4 CPUs for Ray Data, whose read tasks need 1 each, so training "
         "would wait for its data forever; lower --workers or --cpus-per-worker", ray=True),
    Case("tune-rerun-with-other-settings", tune_started,
         "search 's' was started with other settings (max_concurrent 1 then, 2 now), and rerunning it resumes the "
         "search as it was started"),
    Case("tune-nan-champion-margin", lambda d: ["tune", "seg", "--data", str(shards()(d)), "--champion-margin", "nan"],
         "--champion-margin must be a finite number >= 0, got 'nan'", code=2),
    Case("train-run-in-progress", train(shards(), "--run-name", "busy"), f"run 'busy' is in progress in another "
         f"process (pid {os.getpid()}", hold_run="busy"),
    # eval seg: data checked before any model is resolved
    Case("eval-truncated-shard", eval_seg(then(shards(), lambda s: truncate_first(s, "val"))),
         "{d}/shards/val/part-0.parquet: corrupted shard file"),
    Case("eval-empty-split", eval_seg(then(shards(), lambda s: empty_split(s, "val"))), "split 'val' of {d}/shards is empty"),
    Case("eval-missing-split", eval_seg(shards(), "--split", "test"), "{d}/shards has no 'test' split"),
    Case("eval-all-ignored", eval_seg(shards(ignore_split="val")), "every mask pixel of split 'val'"),
    Case("eval-all-ignored-old-manifest", eval_seg(shards(ignore_split="val", per_split_pixels=False)),
         "every mask pixel of split 'val'"),
    # sampling flags (parsed before any model is loaded)
    Case("sample-num-0", lambda d: ["sample", "--num", "0", "--out", str(d / "s")], "--num"),
    Case("sample-steps-0", lambda d: ["sample", "--steps", "0", "--out", str(d / "s")], "--steps"),
    Case("sample-steps-100000", lambda d: ["sample", "--steps", "100000", "--out", str(d / "s")], "--steps"),
    Case("sample-guidance-nan", lambda d: ["sample", "--guidance", "nan", "--out", str(d / "s")], "--guidance"),
    Case("sample-truncated-masks", lambda d: ["sample", "--masks", str(then(shards(), lambda s: truncate_first(s, "val"))(d)),
                                              "--out", str(d / "s")], "{d}/shards/val/part-0.parquet: corrupted shard"),
    # models: the wrong kind, damaged files, settings the model cannot take
    Case("eval-seg-given-a-diffusion-model", lambda d: eval_seg(shards(), "--model", str(diffusion_checkpoint(d)))(d),
         "is a diffusion model (DiffusionConfig), but this command needs a segmenter"),
    Case("eval-gen-given-a-segmenter", lambda d: ["eval", "gen", "--model", str(seg_checkpoint(d)), "--segmenter",
                                                  str(seg_checkpoint(d)), "--data", str(write_shards(d / "shards"))],
         "is a segmenter model (SegConfig), but this command needs a generative model"),
    Case("eval-truncated-weights", lambda d: eval_seg(shards(), "--model",
                                                      str(truncated(seg_checkpoint, "model.safetensors")(d)))(d),
         "model.safetensors"),
    Case("sample-masks-for-unconditional-model",
         lambda d: sample(lambda d: diffusion_checkpoint(d, "none"), "--masks", str(write_shards(d / "shards")))(d),
         "--masks was given, but this model is unconditional"),
    Case("sample-steps-over-T", sample(diffusion_checkpoint, "--steps", "51"),
         "steps 51 exceeds the model's 50 training timesteps; use 1..50"),
    Case("sample-guidance-negative", sample(diffusion_checkpoint, "--guidance=-1"), "--guidance"),
    Case("edit-image-over-pixel-limit", edit("--remove", "sky", image=huge_png), "5000x5000 pixels (width x height) is over the limit"),
    Case("edit-dpmpp-with-resampling", edit("--remove", "sky", "--sampler", "dpmpp", "--resample", "2"),
         "needs the ddpm or ddim sampler"),
    Case("edit-unknown-class", edit("--remove", "unicorn"), "unknown class 'unicorn'"),
    # GANs
    Case("train-gan-image-size-does-not-fit", train(shards(size=(20, 30)), task="gan"),
         "config field 'image_size' (20, 30): both sides must be divisible by 4"),
    Case("train-gan-unknown-loss", train(shards(), "--loss", "lsgan", task="gan"), "invalid choice: 'lsgan'", code=2),
    Case("train-gan-unknown-loss-set", train(shards(), "--set", "loss=lsgan", task="gan"),
         "config field 'loss' must be one of minimax, nsgan, hinge, wgan-gp; got 'lsgan'"),
    Case("train-seg-given-a-gan-loss", train(shards(), "--loss", "hinge"), "--loss does not apply to `train seg`"),
    Case("sample-gan-with-diffusion-steps", sample(gan_checkpoint, "--steps", "3"),
         "--steps: a GAN draws an image in one forward pass"),
    Case("sample-diffusion-with-truncation", sample(diffusion_checkpoint, "--truncation", "1.5"),
         "--truncation applies to GANs only"),
    Case("sample-conditional-gan-without-masks", sample(gan_checkpoint), "has no unconditional mode"),
]


def _snapshot(d: Path) -> dict[str, str]:
    """Every file under the case dir (but the workdir, which commands may create) -> its hash."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and not p.relative_to(d).parts[0] == "wd"}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_one_line(case: Case, tmp_path, request, capsys):
    d = tmp_path
    argv = case.setup(d) + ["--workdir", str(d / "wd")]
    before = _snapshot(d)
    expect = case.expect.format(d=d)
    if case.ray:
        request.getfixturevalue("ray_cluster")
        from jobs.cli import main

        capsys.readouterr()
        code = main(argv)
        out, err = capsys.readouterr()
    else:
        env = {**os.environ, "PYTHONPATH": str(ROOT), **case.env}
        env.pop("RAY_ADDRESS", None)
        hold = None
        if case.hold_run:
            from jobs.runtime import run_lock

            hold = run_lock(d / "wd", case.hold_run)
            hold.__enter__()
        try:
            proc = subprocess.run([sys.executable, "-m", "jobs.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=180)
        finally:
            if hold is not None:
                hold.__exit__(None, None, None)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    assert code != 0, (out, err)
    if case.code is not None:
        assert code == case.code, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err                       # one line, not a log dump
    assert expect in lines[0], (expect, err)
    assert _snapshot(d) == before                     # nothing already written changed or vanished
    assert not [p for p in d.rglob("*") if ".partial-" in p.name]   # no half-written output left behind


def test_iter_split_names_a_corrupted_file(tmp_path):
    """Readers (eval, sample, serving) get an InputError naming the file, not an Arrow traceback."""
    from genseg.errors import InputError
    from pipelines.shards import iter_split

    d = write_shards(tmp_path / "s")
    assert sum(len(b["name"]) for b in iter_split(d, "val")) == 4
    bad = truncate_first(d, "val")
    with pytest.raises(InputError, match=str(bad)):
        list(iter_split(d, "val"))


def test_help_points_to_the_readme():
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert f"{ROOT / 'README.md'}" in text and (ROOT / "README.md").is_file()
    assert "docs/" not in text                       # no pointer to documents the project does not have


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_during_train_says_how_to_resume(tmp_path, how):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or SIGTERM to the genseg
    process alone (``kill``, a scheduler) during `genseg train`: exit 130 with one line holding the
    exact command that resumes the run, and no process of the Ray it started left behind;
    running the command resumes."""
    import shlex
    import signal
    import time

    import psutil

    data = write_shards(tmp_path / "shards", {"train": 8, "val": 4})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    argv = ["train", "seg", "--data", str(data), "--workers", "1", "--epochs", "2", "--batch-size", "2", "--set",
            "width=8", "--workdir", str(tmp_path / "wd")]
    p = subprocess.Popen([sys.executable, "-m", "jobs.cli", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=as_in_a_terminal)
    try:
        for line in p.stdout:
            if line.startswith("epoch 1/2"):
                break
        snapshots = list((tmp_path / "wd" / "ray").glob("*/checkpoint_manager_snapshot.json"))
        deadline = time.monotonic() + 120
        while not snapshots or "checkpoint_" not in snapshots[0].read_text():   # epoch 1's checkpoint is in
            assert time.monotonic() < deadline and p.poll() is None, "no checkpoint after epoch 1"
            time.sleep(0.2)
            snapshots = list((tmp_path / "wd" / "ray").glob("*/checkpoint_manager_snapshot.json"))
        children = psutil.Process(p.pid).children(recursive=True)     # the local Ray it started
        assert children
        if how == "ctrl-c":
            os.killpg(p.pid, signal.SIGINT)
        else:
            os.kill(p.pid, signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    _, alive = psutil.wait_procs(children, timeout=90)
    assert not alive, f"left running: {[c.pid for c in alive]}"
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    assert "Resume it with: genseg train seg" in err
    resume = shlex.split(err.split("Resume it with: ", 1)[1])
    run_name = resume[resume.index("--run-name") + 1]
    assert resume[1:resume.index("--run-name")] == argv                # the same command, plus its run name

    if how == "sigterm":
        return                                                           # resuming is the same as after Ctrl-C
    done = subprocess.run([sys.executable, "-m", "jobs.cli", *resume[1:]], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"resuming seg run '{run_name}'" in done.stdout
    assert "epoch 2/2" in done.stdout and "epoch 1/2" not in done.stdout   # continued after the checkpoint
