"""The champion rule, `resolve` and MLflow pyfunc models on a real sqlite MLflow store (no Ray)."""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from genseg import checkpoint as ck
from genseg import tracking
from genseg.config import SegConfig
from genseg.data.shards import encode_row, fingerprint
from genseg.models import build_segmenter

pytestmark = pytest.mark.integration


def make_shards(root: Path, seed: int, n_val: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", 4), ("val", n_val)):
        rows = [encode_row(f"{split}{i}", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
                           rng.integers(0, 3, (8, 8), dtype=np.uint8)) for i in range(n)]
        (root / split).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), root / split / "part-0.parquet")
    (root / "manifest.json").write_text(json.dumps({
        "format": "genseg-shards/1", "classes": {"names": ["a", "b", "c"]}, "num_classes": 3, "ignore_index": 255,
        "splits": {"train": {"count": 4}, "val": {"count": n_val}}, "sizes": [[8, 8]], "size": [8, 8],
        "class_pixels": [1, 2, 3], "source": {"source": "test"}}))
    return root


@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.setup(tmp_path, uri)
    exp = tracking.experiment_id("genseg-seg", tmp_path)
    cfg = SegConfig(num_classes=3, width=8)
    torch.manual_seed(0)
    ckpt = ck.save(tmp_path / "best", build_segmenter(cfg), cfg, epoch=0, classes={"names": ["a", "b", "c"]})
    return uri, exp, ckpt


def _version(uri, exp, ckpt, score, data, promote=False, tmp=None, margin=0.0):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.create_run(exp)
    tracking.save_pyfunc(ckpt, tmp / f"model-{run.info.run_id}", "segmenter")
    client.log_artifacts(run.info.run_id, str(tmp / f"model-{run.info.run_id}"), "model")
    return tracking.register(run.info.run_id, "model", "genseg-segmenter", tracking.Score("val_miou", score),
                             data_fingerprint=data, scored_on="val", promote=promote, tracking_uri=uri,
                             margin=margin)


def test_champion_rule_on_a_real_registry(store, tmp_path):
    uri, exp, ckpt = store
    a = fingerprint(make_shards(tmp_path / "a", seed=0), "val")[0]
    b = fingerprint(make_shards(tmp_path / "b", seed=1), "val")[0]
    assert a != b and a == fingerprint(tmp_path / "a", "val")[0]

    v1 = _version(uri, exp, ckpt, 0.5, a, tmp=tmp_path)
    assert v1["champion"] and v1["reason"] == "there was no champion"
    worse = _version(uri, exp, ckpt, 0.4, a, tmp=tmp_path)
    assert not worse["champion"] and "does not beat the champion's 0.5" in worse["reason"]
    tie = _version(uri, exp, ckpt, 0.5, a, tmp=tmp_path)
    assert not tie["champion"]
    for bad in (float("nan"), float("inf"), None):
        r = _version(uri, exp, ckpt, bad, a, tmp=tmp_path)
        assert not r["champion"] and "never takes the alias" in r["reason"]
        r = _version(uri, exp, ckpt, bad, a, promote=True, tmp=tmp_path)   # not even with --promote
        assert not r["champion"]
    other = _version(uri, exp, ckpt, 0.99, b, tmp=tmp_path)
    assert not other["champion"] and "scored on other data" in other["reason"] and "--promote" in other["reason"]
    better = _version(uri, exp, ckpt, 0.6, a, tmp=tmp_path)
    assert better["champion"] and better["previous_champion"] == v1["version"]

    champ = tracking.resolve("models:/genseg-segmenter@champion", uri, dst=tmp_path / "dl")
    assert champ.version == better["version"] and champ.alias == "champion" and champ.run_id
    assert ck.load(champ.path).config.num_classes == 3         # the checkpoint inside the pyfunc model
    assert tracking.resolve(f"models:/genseg-segmenter/{v1['version']}", uri, dst=tmp_path / "d2").version == 1

    forced = _version(uri, exp, ckpt, 0.1, b, promote=True, tmp=tmp_path)
    assert forced["champion"] and forced["reason"] == "--promote was given"


def test_champion_margin_on_a_real_registry(store, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, exp, ckpt = store
    a = fingerprint(make_shards(tmp_path / "a", seed=0), "val")[0]
    v1 = _version(uri, exp, ckpt, 0.344, a, tmp=tmp_path)
    noise = _version(uri, exp, ckpt, 0.3446, a, tmp=tmp_path, margin=0.01)   # a seed's worth, not a better recipe
    assert not noise["champion"] and noise["previous_champion"] == v1["version"]
    assert "not by more than the margin 0.01" in noise["reason"]
    client = MlflowClient(uri)
    assert int(client.get_model_version_by_alias("genseg-segmenter", "champion").version) == v1["version"]
    with pytest.raises(ValueError, match="champion margin"):                 # refused before a version exists
        _version(uri, exp, ckpt, 0.9, a, tmp=tmp_path, margin=-1.0)
    assert {int(v.version) for v in client.search_model_versions("name='genseg-segmenter'")} == {1, 2}
    clear = _version(uri, exp, ckpt, 0.3550, a, tmp=tmp_path, margin=0.01)
    assert clear["champion"] and clear["version"] == 3
    assert int(client.get_model_version_by_alias("genseg-segmenter", "champion").version) == 3


def test_a_legacy_champion_without_fingerprint_is_kept_and_says_why():
    keep, why = tracking.decide_champion(tracking.Score("val_miou", 0.9), "abc", "val", {"val_miou": "0.1"})
    assert not keep and "older genseg" in why
    keep, _ = tracking.decide_champion(tracking.Score("val_loss", 0.1, False), "abc", "val",
                                       {tracking.DATA_TAG: "abc", tracking.SPLIT_TAG: "val",
                                        tracking.SCORE_NAME_TAG: "val_x0_mse", tracking.SCORE_TAG: "0.5"})
    assert not keep                                            # another score name is not comparable
    keep, _ = tracking.decide_champion(tracking.Score("val_x0_mse", 0.1, False), "abc", "val",
                                       {tracking.DATA_TAG: "abc", tracking.SPLIT_TAG: "val",
                                        tracking.SCORE_NAME_TAG: "val_x0_mse", tracking.SCORE_TAG: "0.5"})
    assert keep                                                # lower is better for a loss


def test_registered_version_is_a_pyfunc_model(store, tmp_path):
    import mlflow

    uri, exp, ckpt = store
    a = fingerprint(make_shards(tmp_path / "a", seed=0), "val")[0]
    _version(uri, exp, ckpt, 0.5, a, tmp=tmp_path)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/genseg-segmenter@champion")
    images = np.random.default_rng(0).integers(0, 255, (2, 16, 24, 3), dtype=np.uint8)
    labels = model.predict(images)
    assert labels.shape == (2, 16, 24) and labels.dtype == np.uint8 and labels.max() < 3
    from genseg.loading import load

    assert np.array_equal(labels, load(ckpt).segment_batch(images))   # the same network as genseg's loader
    sig = model.metadata.signature
    assert sig is not None and sig.inputs.inputs[0].shape == (-1, -1, -1, 3)


def test_resolve_names_what_is_wrong(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(tracking.RefError, match="not found"):
        tracking.resolve("models:/genseg-segmenter@champion", uri)
    with pytest.raises(tracking.RefError, match="needs an alias or a version"):
        tracking.resolve("models:/genseg-segmenter", uri)
    with pytest.raises(tracking.RefError, match="neither a checkpoint directory"):
        tracking.resolve("no-such-thing", uri)


def test_diffusion_pyfunc_generates_seeded_images_from_label_maps(tmp_path):
    import mlflow

    from genseg.config import DiffusionConfig
    from genseg.models.unet import build_diffusion_model

    cfg = DiffusionConfig(num_classes=3, channels=(8, 16), image_size=(8, 8), timesteps=50, sample_steps=2)
    path = ck.save(tmp_path / "c", build_diffusion_model(cfg), cfg, epoch=0, classes={"names": ["a", "b", "c"]})
    model = mlflow.pyfunc.load_model(str(tracking.save_pyfunc(path, tmp_path / "m", "diffusion")))
    labels = np.random.default_rng(0).integers(0, 3, (2, 8, 8)).astype(np.int64)
    a = model.predict(labels, params={"seed": 3})
    assert a.shape == (2, 8, 8, 3) and a.dtype == np.uint8
    assert np.array_equal(a, model.predict(labels, params={"seed": 3}))
    assert not np.array_equal(a, model.predict(labels, params={"seed": 4}))
    from genseg.loading import load

    assert np.array_equal(a, load(path).generate(torch.from_numpy(labels), 2, seed=3).numpy())


def test_a_searchs_winner_is_held_to_the_champion_margin(store, tmp_path):
    """`tune` registers its winner through `jobs.tune.promote`: the search's margin reaches the rule."""
    from types import SimpleNamespace

    from jobs import tune

    uri, exp, _ = store
    data = make_shards(tmp_path / "a", seed=0)
    zero = _version(uri, exp, store[2], 0.0, fingerprint(data, "val")[0], tmp=tmp_path)
    assert zero["champion"]
    cfg = SegConfig(num_classes=3, width=8)
    winner = ck.save(tmp_path / "winner", build_segmenter(cfg), cfg, epoch=3, metrics={"val_miou": 0.5},
                     classes={"names": ["a", "b", "c"]})
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)

    def promote(margin):
        opts = tune.TuneOptions(data=str(data), name="s", stages=("seg",), spaces={}, base=cfg, champion_margin=margin)
        return tune.promote("seg", winner, opts, SimpleNamespace(tracking_uri=uri), client.create_run(exp).info.run_id,
                            None)

    kept = promote(0.6)
    assert not kept["champion"] and "by 0.5, not by more than the margin 0.6" in kept["reason"]
    taken = promote(0.4)
    assert taken["champion"] and "by 0.5, more than the margin 0.4" in taken["reason"]


def test_a_bad_margin_is_refused_before_a_training_run_starts(tmp_path):
    """`jobs.train_seg.run` (the API under `genseg train seg`) refuses a bad margin before it creates
    an MLflow run or a Ray run directory, not after training, when the winner is registered."""
    from types import SimpleNamespace

    from jobs import train_seg

    data = make_shards(tmp_path / "a", seed=0)
    wd = tmp_path / "wd"
    wd.mkdir()
    rt = SimpleNamespace(workdir=wd, tracking_uri=f"sqlite:///{wd / 'mlflow.db'}", verbose=False)
    with pytest.raises(ValueError, match="champion margin must be a finite number >= 0, got -0.01"):
        train_seg.run(str(data), SegConfig(width=8, batch_size=2), rt, workers=1, run_name="m",
                      champion_margin=-0.01)
    assert list(wd.iterdir()) == []


def test_a_search_and_a_training_run_with_one_name_are_two_mlflow_runs(tmp_path, monkeypatch):
    """`tune seg --name x` and `train seg --run-name x` in one experiment: each reruns its own MLflow
    run, and neither resumes (logs into) the other's.  A run from before runs named their job is
    still found by either."""
    from mlflow.tracking import MlflowClient

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    tracking.setup(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.experiment_id("genseg-seg", tmp_path)
    job = tracking.JOB_TAG

    train, resumed = tracking.start_or_resume_run(exp, "x", {"lr": 1}, tags={job: "train seg"})
    assert not resumed
    search, resumed = tracking.start_or_resume_run(exp, "x", {"space": "s"}, tags={job: "tune seg"})
    assert not resumed and search != train
    assert tracking.start_or_resume_run(exp, "x", {"space": "s"}, tags={job: "tune seg"}) == (search, True)
    assert tracking.start_or_resume_run(exp, "x", {"lr": 1}, tags={job: "train seg"}) == (train, True)
    assert "space" not in MlflowClient().get_run(train).data.params       # nothing of the search in it
    assert tracking.find_run(exp, "x", "train seg").info.run_id == train
    assert tracking.find_run(exp, "x", "tune seg").info.run_id == search

    old = MlflowClient().create_run(exp, tags={tracking.RUN_NAME_TAG: "old"}).info.run_id   # no job tag
    assert tracking.start_or_resume_run(exp, "old", {"lr": 1}, tags={job: "train seg"}) == (old, True)
    assert tracking.find_run(exp, "old", "tune seg").info.run_id == old
