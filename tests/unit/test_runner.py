"""The Ray Train runner's worker-side pieces that need no cluster: the LR schedule after an elastic
resize, and the decoded train-split cache."""
import pytest

pytestmark = pytest.mark.unit


def test_a_resumed_attempt_on_fewer_workers_keeps_its_place_in_the_lr_schedule():
    """Two epochs of a 10-epoch warm-up + cosine schedule on 4 workers (4 steps each), then the run resumes
    on 2 workers (8 steps each): the learning rate continues where it was, not from step 8 of 80."""
    import torch

    from genseg import engine
    from jobs.runner import WorkerSession

    def scheduler(spe):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return engine.make_scheduler(opt, "cosine", 10, 1, spe)

    before = scheduler(4)
    for _ in range(2 * 4):
        before.optimizer.step()
        before.step()
    after = scheduler(8)
    after.load_state_dict(before.state_dict())
    session = WorkerSession.__new__(WorkerSession)
    session.rt = {"steps_per_epoch": 8}
    session._align_schedulers({"model": after}, start=2)
    assert after.last_epoch == 16
    assert after.optimizer.param_groups[0]["lr"] == pytest.approx(before.optimizer.param_groups[0]["lr"])
    assert after.get_last_lr() == pytest.approx(before.get_last_lr())
    assert before.get_last_lr()[0] < 1.0                       # past the warm-up: the value is not trivially 1
    # an unchanged group size leaves a restored schedule exactly as saved
    same = scheduler(4)
    same.load_state_dict(before.state_dict())
    session.rt = {"steps_per_epoch": 4}
    session._align_schedulers({"model": same}, start=2)
    assert same.last_epoch == 8


def test_the_train_split_is_cached_decoded_after_the_first_epoch_and_gives_the_same_batches():
    """Epoch 1 streams the split (here a list of columnar batches) and keeps every row as raw arrays;
    epoch 2 then reads the cache, and its batches hold exactly what streaming would have given."""
    import numpy as np

    from genseg import engine
    from genseg.data.shards import decode_batch, encode_row
    from genseg.data.synthetic import make_scene
    from jobs.runner import WorkerSession

    rows = [encode_row(f"r{i:02d}", *make_scene(0, i, 12, 16), "png") for i in range(10)]
    stream = [{k: [r[k] for r in rows[i: i + 4]] for k in rows[0]} for i in range(0, 10, 4)]
    names = sorted(r["name"] for r in rows)
    session = WorkerSession.__new__(WorkerSession)
    session.rt, session._train_rows = {"cache_train": True}, None
    streamed = list(engine.epoch_batches(session._caching(iter(stream)), names, 0, 1, 0, 1, 3, 3))
    assert session._train_rows is not None and set(session._train_rows["codec"]) == {"raw"}
    cached = list(engine.epoch_batches([session._train_rows], names, 0, 1, 0, 1, 3, 3))
    assert [b["name"] for b in cached] == [b["name"] for b in streamed]
    for a, b in zip(streamed, cached):
        for (ia, ma), (ib, mb) in zip(decode_batch(a), decode_batch(b)):
            assert np.array_equal(ia, ib) and np.array_equal(ma, mb)
    # a stream cut short (an error, a stopped epoch) leaves no half-filled cache behind
    session._train_rows = None
    partial = session._caching(iter(stream))
    next(partial)
    partial.close()
    assert session._train_rows is None


def test_the_train_cache_takes_what_fits_the_limit(monkeypatch):
    from genseg.config import ConfigError
    from jobs.runner import train_cache_mb

    manifest = {"sizes": [[360, 480]], "splits": {"train": {"count": 367}}}
    assert train_cache_mb(manifest) == pytest.approx(367 * 360 * 480 * 4 / 2**20)     # 242 MB: under 2048
    monkeypatch.setenv("GENSEG_TRAIN_CACHE_MB", "100")
    assert train_cache_mb(manifest) is None
    monkeypatch.setenv("GENSEG_TRAIN_CACHE_MB", "0")
    assert train_cache_mb(manifest) is None
    monkeypatch.setenv("GENSEG_TRAIN_CACHE_MB", "lots")
    with pytest.raises(ConfigError, match="GENSEG_TRAIN_CACHE_MB"):
        train_cache_mb(manifest)


def test_elastic_resize_interval_comes_from_the_environment(monkeypatch):
    from genseg.config import ConfigError
    from jobs.runner import _resize_interval

    monkeypatch.setenv("GENSEG_ELASTIC_RESIZE_S", "5")
    assert _resize_interval(True) == {"elastic_resize_monitor_interval_s": 5.0}
    assert _resize_interval(False) == {}              # a fixed group has nothing to resize
    monkeypatch.setenv("GENSEG_ELASTIC_RESIZE_S", "0")
    with pytest.raises(ConfigError, match="GENSEG_ELASTIC_RESIZE_S"):
        _resize_interval(True)
    monkeypatch.delenv("GENSEG_ELASTIC_RESIZE_S")
    assert _resize_interval(True) == {}


def test_a_failed_fit_marks_only_a_running_run_failed(tmp_path):
    """A fit that raises ends its run FAILED; a run the search already ended (an ASHA-stopped Tune trial is
    KILLED) keeps that status, whatever order the two writes reach the store in."""
    from mlflow.tracking import MlflowClient

    from genseg import tracking
    from jobs.runner import _mark_failed

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.setup(tmp_path, uri)
    client = MlflowClient(uri)
    exp = tracking.experiment_id("test-runner", tmp_path)
    running, killed = client.create_run(exp).info.run_id, client.create_run(exp).info.run_id
    client.set_terminated(killed, status="KILLED")
    _mark_failed(client, running)
    _mark_failed(client, killed)
    assert client.get_run(running).info.status == "FAILED"
    assert client.get_run(killed).info.status == "KILLED"


def test_vae_validation_scores_only_the_first_val_images_when_told():
    """``val_images=N``: the epoch's val figures are those of the first N images, not of all of them."""
    import types

    import numpy as np
    import torch

    from genseg.config import VAEConfig
    from genseg.data.shards import encode_row
    from genseg.models.vae import build_vae
    from jobs.train_vae import _val_scores

    rng = np.random.default_rng(0)
    rows = [encode_row(f"v{i}", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) if i >= 3 else
                       np.full((16, 16, 3), 40 * i, np.uint8), np.zeros((16, 16), np.uint8)) for i in range(8)]

    class Shard:
        def __init__(self, rows):
            self.rows = rows

        def iter_batches(self, batch_size, batch_format):
            for i in range(0, len(self.rows), batch_size):
                chunk = self.rows[i: i + batch_size]
                yield {k: np.array([r[k] for r in chunk], dtype=object) for k in chunk[0]}

    torch.manual_seed(0)
    net = build_vae(VAEConfig(channels=(8, 16), norm_groups=4, latent_channels=3, image_size=(16, 16)))
    session = types.SimpleNamespace(world=1, rank=0, device=torch.device("cpu"), mean=lambda v: v)
    first3 = _val_scores(net, Shard(rows), (16, 16), session, limit=3)
    assert first3 == _val_scores(net, Shard(rows[:3]), (16, 16), session)
    assert first3["val_psnr"] != _val_scores(net, Shard(rows), (16, 16), session)["val_psnr"]
