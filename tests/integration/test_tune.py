"""`genseg tune` on a real local Ray (Tune + Train) and sqlite MLflow, on tiny synthetic data."""
import json
import shutil

import pytest
import yaml
from mlflow.tracking import MlflowClient

from genseg import checkpoint as ck
from jobs.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = ["--set", "channels=16,32", "--set", "batch_size=4", "--set", "sample_steps=3", "--set", "sample_every=1",
        "--set", "ema_decay=0.0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    shards = root / "shards"
    assert main(["prepare", "--source", "synthetic", "--num", "40", "--size", "16x24", "--val-fraction", "0.5",
                 "--out", str(shards), "--workdir", str(root / "prep")]) == 0
    return root, shards, _segmenter(root / "seg", shards)


def _segmenter(path, shards):
    """A small untrained segmenter for the data in ``shards`` (fresh random weights each call)."""
    from genseg.config import SegConfig
    from genseg.models import build_segmenter

    cfg = SegConfig(num_classes=7, width=8)
    return ck.save(path, build_segmenter(cfg), cfg, epoch=0,
                   classes=json.loads((shards / "manifest.json").read_text())["classes"])


def _space(path, spec: dict):
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _runs(uri: str, experiment: str, parent: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def test_schedule_and_guidance_search_asha_promotion_and_resume(ray_cluster, data, tmp_path, capsys, monkeypatch):
    root, shards, seg = data
    wd = str(tmp_path / "wd")
    # the second trial cannot learn (lr 1e-9): ASHA must stop it after its first epoch
    space = _space(tmp_path / "space.yaml", {"schedule": {"lr": [0.003, 1e-9], "schedule": ["linear"]},
                                             "sampling": {"guidance": [0, 1, 3], "sampler": ["ddim"], "steps": [3]}})
    cmd = ["tune", "diffusion", "--data", str(shards), "--space", space, "--epochs", "2", *TINY,
           "--segmenter", str(seg), "--num", "8", "--name", "t", "--workdir", wd, "--json", str(tmp_path / "t.json")]
    capsys.readouterr()
    assert main(cmd) == 0
    out = capsys.readouterr().out
    assert "objective: minimise FD" in out                      # what "best" meant is printed with the result
    assert "[schedule] trial 2/2" in out and "[sampling] trial 3/3" in out   # a line per finished trial
    res = json.loads((tmp_path / "t.json").read_text())

    sched = {r["params"]["lr"]: r for r in res["stages"]["schedule"]["trials"]}
    assert sched[0.003]["status"] == "finished" and sched[0.003]["epochs"] == 2
    assert sched[1e-9]["status"] == "early-stopped" and sched[1e-9]["epochs"] == 1
    assert res["stages"]["schedule"]["best"]["params"]["lr"] == 0.003

    trials = res["stages"]["sampling"]["trials"]
    assert sorted(r["params"]["guidance"] for r in trials) == [0, 1, 3]
    objs = [r["metrics"]["objective"] for r in trials]
    assert objs == sorted(objs)                                   # best first
    best = res["stages"]["sampling"]["best"]
    assert best["metrics"]["objective"] == min(objs)
    own = res["stages"]["sampling"]["default"]
    if res["stages"]["sampling"]["chosen"]["own_settings_kept"]:
        # the trained model's own settings scored at least as well as every trial: they are what is kept
        # (which side wins depends on the two-epoch model's samples, not on the code under test)
        from genseg.generation import SamplingSettings

        assert own["metrics"]["objective"] <= min(objs)
        assert res["best_sampling"] == SamplingSettings.from_dict(own["settings"]).to_dict()
    else:
        assert own["metrics"]["objective"] > min(objs)
        assert res["best_sampling"] == {"sampler": "ddim", "steps": 3, "guidance": float(best["params"]["guidance"])}

    # MLflow: one parent, a child run per trial, with how each ended
    uri = f"sqlite:///{tmp_path / 'wd' / 'mlflow.db'}"
    children = _runs(uri, "genseg-diffusion", res["mlflow_run_id"])
    assert len(children) == 5
    by_status = sorted(c.data.tags.get("genseg.tune.status", "?") for c in children)
    assert by_status == ["early-stopped", "finished", "finished", "finished", "finished"]
    assert sum(c.data.tags.get("genseg.job") == "tune sampling trial" for c in children) == 3
    assert sum(c.data.tags.get("genseg.job") == "train diffusion" for c in children) == 2   # the schedule trials
    client = MlflowClient(uri)
    assert client.get_run(res["mlflow_run_id"]).data.tags["genseg.job"] == "tune diffusion"
    stopped = next(c for c in children if c.data.tags.get("genseg.tune.status") == "early-stopped")
    assert stopped.info.status == "KILLED"
    # per-epoch metrics.  ASHA's stop reaches the trial asynchronously: with epochs of a tenth of a
    # second its worker may log epoch 2 before the stop lands (Tune still counts the trial as stopped
    # at epoch 1, asserted above)
    assert 1 <= len(client.get_metric_history(stopped.info.run_id, "val_x0_mse")) <= 2

    # the winner is the champion, with the tuned sampling settings stored with it; `sample` uses them
    champ = client.get_model_version_by_alias("genseg-diffusion", "champion")
    assert json.loads(champ.tags["genseg.sampling"]) == res["best_sampling"]
    assert res["registered"]["champion"] and res["registered"]["version"] == int(champ.version)
    assert main(["sample", "--num", "2", "--out", str(tmp_path / "s"), "--masks", str(shards), "--workdir", wd]) == 0
    assert json.loads((tmp_path / "s" / "samples.json").read_text())["sampling"] == res["best_sampling"]

    # rerun with the same name: nothing is searched or registered again
    capsys.readouterr()
    assert main(cmd) == 0
    out = capsys.readouterr().out
    assert out.count("not searched again") == 2 and "already registered" in out
    assert "another MLflow store" not in out and "\nregistered " not in out     # nor as if registered now
    assert len(_runs(uri, "genseg-diffusion", res["mlflow_run_id"])) == 5
    # ... and nothing is logged again to the search's run
    assert len(client.get_metric_history(res["mlflow_run_id"], "sampling.best.objective")) == 1
    # ... unless the search's run is not found (tracked elsewhere): the new run gets each stage's best
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    capsys.readouterr()
    assert main([*cmd[:-1], str(tmp_path / "elsewhere.json"), "--tracking-uri", elsewhere]) == 0
    # ... and says its winner was registered in the search's own store, not in this one
    assert (f"already registered by an earlier run of 't' in another MLflow store ({uri}), not in {elsewhere}: "
            f"genseg-diffusion version {res['registered']['version']}") in capsys.readouterr().out
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):   # mlflow exported them: the commands below
        monkeypatch.delenv(var, raising=False)                   # track where the search did
    moved = json.loads((tmp_path / "elsewhere.json").read_text())
    assert moved["mlflow_run_id"] != res["mlflow_run_id"]
    logged = MlflowClient(elsewhere).get_run(moved["mlflow_run_id"]).data.metrics
    assert logged["sampling.best.objective"] == pytest.approx(best["metrics"]["objective"])
    sched_best = res["stages"]["schedule"]["best"]["metrics"]["val_x0_mse"]
    assert logged["schedule.best.val_x0_mse"] == pytest.approx(sched_best)
    there = {a.path for a in MlflowClient(elsewhere).list_artifacts(moved["mlflow_run_id"])}
    assert {"schedule_trials.txt", "sampling_trials.txt"} <= there
    assert ("guidance_tradeoff.png" in there) == bool(res["stages"]["sampling"]["picture"])

    # a rerun asking for another space would resume the search as it was started: refused in one line,
    # naming what differs, with nothing of the search changed
    state = tmp_path / "wd" / "tune" / "t" / "genseg_state.json"
    kept = state.read_bytes()
    other = _space(tmp_path / "other.yaml", {"schedule": {"lr": [0.003, 1e-9, 0.01], "schedule": ["linear"]},
                                             "sampling": {"guidance": [0, 1, 3], "sampler": ["ddim"], "steps": [3]}})
    capsys.readouterr()
    assert main([other if a == space else a for a in cmd]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "search 't' was started with other settings" in err
    assert "(space.lr [0.003, 1e-09] then, [0.003, 1e-09, 0.01] now)" in err
    assert state.read_bytes() == kept and len(_runs(uri, "genseg-diffusion", res["mlflow_run_id"])) == 5

    # an interrupted sampling stage (its trials done, the stage not yet recorded) continues from Tune's
    # state: no trial runs again
    doc = json.loads(state.read_text())
    del doc["sampling"], doc["registered"]
    state.write_text(json.dumps(doc))
    # ... but not with another segmenter than the one its trials scored with: that is another search
    # (refused when Tune's experiment is about to be restored, after the settings check let it through)
    other_seg = _segmenter(tmp_path / "seg2", shards)
    assert ck.weights_digest(other_seg) != ck.weights_digest(seg)
    interrupted, definition = state.read_bytes(), (state.parent / "genseg_definition.json").read_bytes()
    capsys.readouterr()
    assert main([str(other_seg) if a == str(seg) else a for a in cmd]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "search 't' was started with other settings (segmenter weights " in err
    assert state.read_bytes() == interrupted and (state.parent / "genseg_definition.json").read_bytes() == definition
    assert len(_runs(uri, "genseg-diffusion", res["mlflow_run_id"])) == 5
    capsys.readouterr()
    assert main(cmd) == 0
    out = capsys.readouterr().out
    assert "[sampling] resuming the search" in out and "[sampling] trial 1/" not in out
    assert len(_runs(uri, "genseg-diffusion", res["mlflow_run_id"])) == 5
    again = json.loads((tmp_path / "t.json").read_text())
    assert again["best_sampling"] == res["best_sampling"]
    # the re-registered version holds the champion's own weights: it takes the alias
    assert again["registered"]["champion"] and "own weights" in again["registered"]["reason"]

    # the sampling search alone, model-based (Optuna TPE) over a range, on the champion
    tpe = _space(tmp_path / "tpe.yaml", {"sampling": {"guidance": {"low": 0.0, "high": 4.0}, "steps": [3]}})
    capsys.readouterr()
    tpe_cmd = ["tune", "diffusion", "--stage", "sampling", "--data", str(shards), "--space", tpe, "--search", "tpe",
               "--samples", "3", "--segmenter", str(seg), "--num", "8", "--name", "tpe", "--workdir", wd,
               "--json", str(tmp_path / "tpe.json")]
    assert main(tpe_cmd) == 0
    t = json.loads((tmp_path / "tpe.json").read_text())
    ws = [r["params"]["guidance"] for r in t["stages"]["sampling"]["trials"]]
    assert len(set(ws)) == 3 and all(0.0 <= w <= 4.0 for w in ws)
    chosen = t["stages"]["sampling"]["chosen"]
    own = t["stages"]["sampling"]["default"]
    assert own["settings"] == res["best_sampling"]          # the champion's tuned settings are its own now
    if chosen["own_settings_kept"]:                          # no trial beat them: nothing is registered
        assert t["registered"] is None and t["best_sampling"] == res["best_sampling"]
        assert own["metrics"]["objective"] <= min(r["metrics"]["objective"] for r in t["stages"]["sampling"]["trials"])
    else:
        assert t["best_sampling"]["guidance"] == t["stages"]["sampling"]["best"]["params"]["guidance"]
        assert t["registered"]["champion"]
    # registered (or nothing to register), the search needs its tuned checkpoint no more: a rerun
    # after it was deleted reports the search, it does not fail
    assert t["best_checkpoint"] == t["stages"]["sampling"]["model"]
    shutil.rmtree(t["best_checkpoint"])
    capsys.readouterr()
    assert main(tpe_cmd) == 0
    assert "[sampling] finished in an earlier run of 'tpe'" in capsys.readouterr().out


def test_a_bad_search_space_is_one_line_before_any_trial(data, tmp_path, capsys):
    root, shards, seg = data
    wd = tmp_path / "wd"
    for spec, msg in [({"schedule": {"scheduel": ["linear"]}}, "unknown field(s) scheduel"),
                      ({"schedule": {"beta_start": {"low": 0.03, "high": 0.05}}}, "'beta_start': value 0.03"),
                      ({"sampling": {"steps": [5000]}}, "value 5000"),
                      ({"schedule": {"lr": {"low": 0.001, "high": 0.01}}}, "a grid needs lists"),
                      ({"serve": {"lr": [1]}}, "unknown stage")]:
        capsys.readouterr()
        code = main(["tune", "diffusion", "--data", str(shards), "--space", _space(tmp_path / "s.yaml", spec),
                     "--segmenter", str(seg), "--workdir", str(wd)])
        err = capsys.readouterr().err
        assert code == 1 and msg in err and len(err.strip().splitlines()) == 1, (spec, err)
    assert not (wd / "tune").exists()                       # no search was started


def test_tune_seg_searches_the_recipe_and_registers_the_best(ray_cluster, data, tmp_path, capsys):
    root, shards, seg = data
    wd = str(tmp_path / "wd")
    space = _space(tmp_path / "space.yaml", {"seg": {"lr": [0.01, 1e-9], "class_weights": ["none"]}})
    assert main(["tune", "seg", "--data", str(shards), "--space", space, "--epochs", "2", "--set", "width=8",
                 "--set", "batch_size=4", "--name", "s", "--workdir", wd, "--json", str(tmp_path / "s.json")]) == 0
    res = json.loads((tmp_path / "s.json").read_text())
    trials = {r["params"]["lr"]: r for r in res["stages"]["seg"]["trials"]}
    assert len(trials) == 2 and res["stages"]["seg"]["metric"] == "best_miou"
    best = res["stages"]["seg"]["best"]
    assert best["metrics"]["best_miou"] == max(r["metrics"]["best_miou"] for r in trials.values()
                                               if r["metrics"].get("best_miou") is not None)
    client = MlflowClient(f"sqlite:///{tmp_path / 'wd' / 'mlflow.db'}")
    champ = client.get_model_version_by_alias("genseg-segmenter", "champion")
    assert res["registered"]["version"] == int(champ.version) and champ.run_id == best["mlflow_run_id"]
    assert float(champ.tags["val_miou"]) == pytest.approx(best["metrics"]["best_miou"], abs=1e-5)
