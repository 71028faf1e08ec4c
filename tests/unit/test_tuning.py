"""Search spaces, their validation, the tuning objective and ranking (genseg.tuning; no Ray)."""
import json
import math

import pytest
import torch

from genseg import checkpoint as ck
from genseg import config as config_lib
from genseg import tracking
from genseg.config import DiffusionConfig, SegConfig
from genseg.generation import SamplingSettings
from genseg.tuning import Objective, Range, SearchSpace, SpaceError, TrialRow, format_table, rank

pytestmark = pytest.mark.unit

SCHEDULE = ("schedule", "timesteps", "beta_start", "beta_end", "prediction", "lr")


def _diffusion(over: dict):
    return config_lib.replace(DiffusionConfig(num_classes=3, image_size=(16, 24)), over)


def test_objective_is_exact_on_constructed_metrics():
    obj = Objective(min_fraction=0.9, penalty=100.0)
    ok = {"fd": 2.0, "seg_miou_fraction_of_ceiling": 0.95}
    short = {"fd": 2.0, "seg_miou_fraction_of_ceiling": 0.8}
    assert obj.value(ok) == 2.0 and obj.feasible(ok)
    assert obj.value(short) == pytest.approx(2.0 + 100.0 * 0.1) and not obj.feasible(short)
    assert obj.value({"fd": 1.5}) == 1.5                    # unconditional: FD alone
    assert obj.value({"fd": float("nan")}) == math.inf      # a failed score never ranks first
    assert obj.value({"seg_miou_fraction_of_ceiling": 1.0}) == math.inf
    # a feasible setting with a higher FD beats an infeasible one with a lower FD
    assert obj.value({"fd": 3.0, "seg_miou_fraction_of_ceiling": 0.91}) < obj.value(
        {"fd": 1.0, "seg_miou_fraction_of_ceiling": 0.85})
    assert Objective(min_fraction=0.0).value(short) == 2.0
    assert "FD + 100 x max(0, 0.9 - mIoU fraction)" in obj.describe()
    with pytest.raises(Exception, match="min-fraction"):
        Objective(min_fraction=1.5)


def test_space_parsing_and_shape_errors():
    s = SearchSpace.parse({"schedule": ["linear", "cosine"], "lr": {"low": 1e-4, "high": 1e-2, "log": True},
                           "timesteps": {"values": [500, 1000]}, "steps": {"low": 10, "high": 50, "int": True},
                           "guidance": 2.0}, "x")
    assert s.fields["schedule"] == ["linear", "cosine"] and s.fields["timesteps"] == [500, 1000]
    assert s.fields["lr"] == Range(1e-4, 1e-2, log=True) and s.fields["steps"].ends() == [10, 50]
    assert s.fields["guidance"] == [2.0] and s.size is None          # a range: no grid
    assert SearchSpace.parse({"a": [1, 2], "b": [3, 4, 5]}, "x").size == 6
    for bad, msg in [({"lr": []}, "empty"), ({"lr": {"low": 2, "high": 1}}, "empty range"),
                     ({"lr": {"low": 0, "high": 1, "log": True}}, "low > 0"),
                     ({"lr": {"low": 1.5, "high": 3, "int": True}}, "whole-number"),
                     ({"lr": {"low": 1, "high": 2, "step": 1}}, "unknown key"),
                     ({"lr": {"high": 2}}, "needs numbers")]:
        with pytest.raises(SpaceError, match=msg):
            SearchSpace.parse(bad, "schedule")
    with pytest.raises(SpaceError, match="a range"):
        SearchSpace.parse({"lr": {"low": 1, "high": 2}}, "s").check_grid()
    SearchSpace.parse({"lr": [1, 2]}, "s").check_grid()


def test_space_check_names_unknown_fields_and_impossible_values():
    good = SearchSpace.parse({"schedule": ["linear", "cosine"], "beta_end": [0.01, 0.02]}, "schedule")
    good.check(SCHEDULE, _diffusion, "schedule")
    with pytest.raises(SpaceError, match="unknown field.*'?scheduel"):
        SearchSpace.parse({"scheduel": ["linear"]}, "schedule").check(SCHEDULE, _diffusion, "schedule")
    with pytest.raises(SpaceError, match="field 'schedule': value 'quadratic'"):
        SearchSpace.parse({"schedule": ["linear", "quadratic"]}, "schedule").check(SCHEDULE, _diffusion, "schedule")
    # beta_start up to 0.05 is above every beta_end the space allows: no trial could use it
    with pytest.raises(SpaceError, match="'beta_start': value 0.05"):
        SearchSpace.parse({"beta_start": {"low": 1e-4, "high": 0.05}, "beta_end": [0.02, 0.03]}, "schedule").check(
            SCHEDULE, _diffusion, "schedule")
    # ...but a beta_start that some searched beta_end admits is fine (0.01 < 0.02)
    SearchSpace.parse({"beta_start": {"low": 1e-4, "high": 0.01}, "beta_end": [0.005, 0.02]}, "schedule").check(
        SCHEDULE, _diffusion, "schedule")
    # a field the stage does not search (the data's class count) is refused by name
    with pytest.raises(SpaceError, match="num_classes"):
        SearchSpace.parse({"num_classes": [3]}, "schedule").check(SCHEDULE, _diffusion, "schedule")


def test_sampling_space_check_knows_the_models_timesteps():
    base = SamplingSettings("ddim", 25, 2.0)

    def build(over):
        return SamplingSettings(**{**base.to_dict(), **over}).validated(max_steps=100)

    SearchSpace.parse({"steps": [20, 100], "guidance": [0, 5]}, "sampling").check(("sampler", "steps", "guidance"),
                                                                                  build, "sampling")
    for spec, msg in [({"steps": [20, 200]}, "value 200.*exceeds the model's 100"),
                      ({"guidance": [-1, 2]}, "value -1.*guidance"),
                      ({"sampler": ["euler"]}, "value 'euler'.*unknown")]:
        with pytest.raises(SpaceError, match=msg):
            SearchSpace.parse(spec, "sampling").check(("sampler", "steps", "guidance"), build, "sampling")


def test_rank_puts_failed_scores_last_and_respects_direction():
    rows = [TrialRow("a", {"w": 1}, {"fd": 2.0}, "finished"), TrialRow("b", {"w": 2}, {"fd": float("nan")}, "error"),
            TrialRow("c", {"w": 3}, {"fd": 1.0}, "finished"), TrialRow("d", {"w": 4}, {}, "error")]
    assert [r.trial_id for r in rank(rows, "fd", higher_is_better=False)] == ["c", "a", "b", "d"]
    assert [r.trial_id for r in rank(rows, "fd", higher_is_better=True)] == ["a", "c", "b", "d"]
    table = format_table(rank(rows, "fd", False), ["w"], ["fd"]).splitlines()
    assert table[0].split() == ["trial", "w", "fd", "status"] and table[2].split() == ["c", "3", "1", "finished"]


def test_weights_digest_ignores_metadata_and_sees_weights(tmp_path):
    from genseg.models import build_segmenter

    cfg = SegConfig(num_classes=3, width=8)
    torch.manual_seed(0)
    a = ck.save(tmp_path / "a", build_segmenter(cfg), cfg, epoch=0)
    tuned = ck.copy_with_meta(a, tmp_path / "tuned", sampling={"sampler": "ddim", "steps": 9, "guidance": 1.0})
    torch.manual_seed(1)
    b = ck.save(tmp_path / "b", build_segmenter(cfg), cfg, epoch=0)
    assert ck.load(tuned).meta["sampling"]["steps"] == 9 and ck.load(tuned).epoch == 0
    assert ck.weights_digest(a) == ck.weights_digest(tuned) != ck.weights_digest(b)


def test_champion_rule_lets_the_champions_own_weights_replace_it():
    cur = {tracking.DATA_TAG: "d", tracking.SPLIT_TAG: "val", tracking.SCORE_NAME_TAG: "val_x0_mse",
           tracking.SCORE_TAG: "0.5", tracking.WEIGHTS_TAG: "w1"}
    score = tracking.Score("val_x0_mse", 0.5, higher_is_better=False)
    take, why = tracking.decide_champion(score, "d", "val", cur, new_weights="w1")
    assert take and "own weights" in why
    assert not tracking.decide_champion(score, "d", "val", cur, new_weights="w2")[0]       # a tie keeps it
    assert not tracking.decide_champion(score, "other", "val", cur, new_weights="w1")[0]   # other data: not comparable
    nan = tracking.Score("val_x0_mse", float("nan"), higher_is_better=False)
    assert not tracking.decide_champion(nan, "d", "val", cur, new_weights="w1")[0]


@pytest.mark.parametrize("higher, champ, inside, outside", [
    (True, "0.3442", 0.3500, 0.3543),       # mIoU: higher is better
    (False, "0.0500", 0.0450, 0.0399),      # a loss: lower is better, the margin counts downwards
])
def test_champion_margin_keeps_the_champion_on_gains_inside_it(higher, champ, inside, outside):
    name = "holdout_miou" if higher else "val_x0_mse"
    cur = {tracking.DATA_TAG: "d", tracking.SPLIT_TAG: "holdout", tracking.SCORE_NAME_TAG: name,
           tracking.SCORE_TAG: champ}

    def decide(value, margin):
        return tracking.decide_champion(tracking.Score(name, value, higher), "d", "holdout", cur, margin=margin)

    take, why = decide(inside, 0.01)             # better, but by less than the margin
    assert not take and f"by {abs(float(champ) - inside):.3g}, not by more than the margin 0.01" in why
    assert decide(inside, 0.0)[0]                # the default: any gain takes the alias
    take, why = decide(outside, 0.01)
    assert take and "more than the margin 0.01" in why
    worse = 0.3 if higher else 0.06
    assert "does not beat" in decide(worse, 0.01)[1]
    # --promote and the champion's own weights still override the margin
    own = {**cur, tracking.WEIGHTS_TAG: "w1"}
    assert tracking.decide_champion(tracking.Score(name, inside, higher), "d", "holdout", own, new_weights="w1",
                                    margin=0.01)[0]
    assert tracking.decide_champion(tracking.Score(name, inside, higher), "d", "holdout", cur, promote=True,
                                    margin=0.01)[0]
    for bad in (-0.01, float("nan"), float("inf"), True, "0.01"):
        with pytest.raises(ValueError, match="champion margin must be a finite number >= 0"):
            decide(outside, bad)


def test_champion_margin_means_more_than_m_and_rounding_does_not_clear_it():
    import numpy as np

    cur = {tracking.DATA_TAG: "d", tracking.SPLIT_TAG: "val", tracking.SCORE_NAME_TAG: "val_miou",
           tracking.SCORE_TAG: "0.5"}

    def take(value, margin, champion="0.5"):
        return tracking.decide_champion(tracking.Score("val_miou", value), "d", "val",
                                        {**cur, tracking.SCORE_TAG: champion}, margin=margin)[0]

    assert not take(0.75, 0.25)                  # exactly M (exact in binary) is not more than M
    assert take(0.75 + 1e-6, 0.25)
    assert not take(0.3542, 0.01, champion="0.3442")     # 0.010000000000000009 in floats: still exactly M
    assert take(0.3543, 0.01, champion="0.3442")
    assert take(0.6, np.float32(0.05))           # any real number type


def test_tune_passes_the_champion_margin_to_the_search(tmp_path):
    from jobs.cli import build_parser, tune_options

    (tmp_path / "manifest.json").write_text(json.dumps({
        "format": "genseg-shards/1", "classes": {"names": ["a", "b", "c"]}, "num_classes": 3, "ignore_index": 255,
        "splits": {"train": {"count": 4}, "val": {"count": 2}}, "sizes": [[8, 8]], "size": [8, 8],
        "class_pixels": [1, 2, 3]}))

    def margin(*flags):
        return tune_options(build_parser().parse_args(["tune", "seg", "--data", str(tmp_path), *flags])).champion_margin

    assert margin("--champion-margin", "0.02") == 0.02 and margin() == 0.0


def test_training_trials_at_once_must_leave_a_cpu_for_ray_data():
    from genseg.errors import InputError
    from jobs.tune import TuneOptions, check_training_fits

    def opts(concurrent, workers=1, cpus=1.0, stages=("seg",)):
        return TuneOptions(data="d", name="s", stages=stages, spaces={}, base=SegConfig(), max_concurrent=concurrent,
                           workers=workers, cpus_per_worker=cpus)

    check_training_fits(opts(2), 4.0)                  # 2.02 CPUs held, 1.98 left for Ray Data
    with pytest.raises(InputError) as e:                # 3.03 held leaves 0.97: the trials wait forever
        check_training_fits(opts(3), 4.0)
    assert "--max-concurrent 3" in str(e.value) and "leave 0.97 of Ray's 4 CPUs" in str(e.value)
    assert "at most 2 fit at once" in str(e.value)
    check_training_fits(opts(3, cpus=0.5), 4.0)        # half-CPU workers: 1.53 held
    check_training_fits(opts(None, workers=2), 4.0)    # the default, one trial: 2.01 held
    with pytest.raises(InputError) as e:                # 3.01 held leaves 0.99
        check_training_fits(opts(None, workers=3), 4.0)
    assert str(e.value).startswith("1 training trial(s) at once of 3 worker(s)") and "not even one fits" in str(e.value)
    check_training_fits(opts(8, stages=("sampling",)), 4.0)   # sampling trials read no shards through Ray Data
    check_training_fits(opts(3), None)                 # no local Ray (or a joined cluster): not judged


def test_a_training_run_must_leave_a_cpu_for_ray_data_on_a_local_ray(monkeypatch):
    from types import SimpleNamespace

    from genseg.errors import InputError
    from jobs.runtime import check_room_for_data, local_cpus

    check_room_for_data(3.0, 4.0, "3 workers", "fewer")           # one CPU left: enough
    with pytest.raises(InputError, match=r"^3.5 CPUs leave 0.50 of Ray's 4 CPUs for Ray Data.*; fewer$"):
        check_room_for_data(3.5, 4.0, "3.5 CPUs", "fewer")
    check_room_for_data(40.0, None, "anything", "")               # not judged
    # a cluster joined by address is not judged by its size now (an autoscaler may grow it)
    assert local_cpus(SimpleNamespace(ray_address="10.0.0.1:6379")) is None
    assert local_cpus(SimpleNamespace(ray_address="auto")) is None
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    assert local_cpus(SimpleNamespace(ray_address=None)) == 4.0


def test_a_rerun_of_a_search_with_other_settings_is_refused_naming_each_one(tmp_path):
    """Rerunning a search resumes Ray Tune's saved experiment as it was started (its space, its
    concurrency, its base recipe): a rerun asking for others would silently get the old ones."""
    from dataclasses import replace
    from types import SimpleNamespace

    from jobs.tune import TuneError, TuneOptions, _check_inputs, _record_stage, check_same_search

    rt = SimpleNamespace(workdir=tmp_path)
    seeds = SearchSpace.parse({"seed": [0, 1, 2]}, "seg")
    first = TuneOptions(data=str(tmp_path / "shards"), name="s", stages=("seg",), spaces={"seg": seeds},
                        base=SegConfig(width=64, crop=(8, 8)), max_concurrent=3)
    check_same_search(first, rt)                    # nothing recorded yet: nothing to judge
    _record_stage(first, rt, "seg", {})
    # recorded, but interrupted before Tune wrote anything: nothing to resume, so not judged
    check_same_search(replace(first, max_concurrent=2), rt)
    (tmp_path / "tune" / "s" / "seg").mkdir(parents=True)      # Tune's experiment: now it can be resumed
    check_same_search(first, rt)                    # the same command again continues it
    # what acts after the search (registration) may change; so may an equivalent spelling of the same
    check_same_search(replace(first, promote=True, champion_margin=0.01, data=str(tmp_path / "x" / ".." / "shards")),
                      rt)

    def refused(opts) -> str:
        with pytest.raises(TuneError) as e:
            check_same_search(opts, rt)
        assert str(e.value).startswith(f"search '{opts.name}' was started with other settings (")
        assert "give a new --name" in str(e.value) and "\n" not in str(e.value)
        return str(e.value)

    assert "max_concurrent 3 then, 2 now" in refused(replace(first, max_concurrent=2))
    assert "space.seed [0, 1, 2] then, [0, 1, 2, 3] now" in refused(
        replace(first, spaces={"seg": SearchSpace.parse({"seed": [0, 1, 2, 3]}, "seg")}))
    both = refused(replace(first, base=SegConfig(width=32, epochs=40, crop=(8, 8))))
    assert "base.width 64 then, 32 now" in both and f"base.epochs {SegConfig().epochs} then, 40 now" in both
    assert "base.crop [8, 8] then, [8, 16] now" in refused(replace(first, base=SegConfig(width=64, crop=(8, 16))))
    assert "data " in refused(replace(first, data=str(tmp_path / "other")))
    # the default concurrency (one training trial) and --max-concurrent 1 are the same search
    one = replace(first, name="one", max_concurrent=None)
    _record_stage(one, rt, "seg", {})
    (tmp_path / "tune" / "one" / "seg").mkdir(parents=True)
    check_same_search(replace(one, max_concurrent=1), rt)
    assert "max_concurrent 1 then, 2 now" in refused(replace(one, max_concurrent=2))

    # a sampling stage is pinned to the model it tuned: a champion alias that moved is refused on resume
    samp = TuneOptions(data=str(tmp_path / "shards"), name="g", stages=("sampling",),
                       spaces={"sampling": SearchSpace.parse({"guidance": [0, 1]}, "sampling")}, base=None,
                       model=str(tmp_path / "ckpt"), segmenter=str(tmp_path / "seg"))
    _record_stage(samp, rt, "sampling", {"model weights": "aaaa", "segmenter weights": "bbbb"})
    _check_inputs(samp, rt, "sampling", {"model weights": "aaaa", "segmenter weights": "bbbb"})
    with pytest.raises(TuneError, match='model weights "aaaa" then, "cccc" now'):
        _check_inputs(samp, rt, "sampling", {"model weights": "cccc", "segmenter weights": "bbbb"})
    (tmp_path / "tune" / "g" / "sampling").mkdir(parents=True)
    assert "num 64 then, 8 now" in refused(replace(samp, num=8))
    # the model is pinned by its weights, not by its name: the same checkpoint named by its alias is the
    # same search (were the names judged, this would be refused)
    check_same_search(replace(samp, model="models:/genseg-diffusion@champion", segmenter="runs:/abc/best"), rt)
    # a record written when other fields were judged (the model refs, before) or before a field was judged
    # is judged on the fields both know; a space parameter added or dropped always differs
    import json

    rec = tmp_path / "tune" / "g" / "genseg_definition.json"
    doc = json.loads(rec.read_text())
    doc["sampling"]["settings"]["segmenter"] = "models:/genseg-segmenter@champion"
    del doc["sampling"]["settings"]["batch_size"]
    rec.write_text(json.dumps(doc))
    check_same_search(samp, rt)
    assert "num 64 then, 8 now" in refused(replace(samp, num=8))
    assert "space.steps null then, [4] now" in refused(
        replace(samp, spaces={"sampling": SearchSpace.parse({"guidance": [0, 1], "steps": [4]}, "sampling")}))

    # a stage Tune holds state for without a record (a search older than the records) is not judged
    (tmp_path / "tune" / "old" / "seg").mkdir(parents=True)
    check_same_search(replace(first, name="old", max_concurrent=2), rt)


def test_a_finished_sampling_search_registers_the_model_it_tuned_not_what_model_names_now(tmp_path):
    """A sampling search interrupted between its trials and its registration registers, on a rerun,
    the weights its settings were tuned on, even if --model (a champion alias) names others by then."""
    from jobs.tune import TuneError, TuneOptions, tuned_model

    tuned = tmp_path / "tuned"
    tuned.mkdir()
    opts = TuneOptions(data=str(tmp_path), name="g", stages=("sampling",), spaces={}, base=None,
                       model=str(tmp_path / "another"))
    assert tuned_model({"model": str(tuned)}, opts, must_exist=True) == tuned
    tuned.rmdir()
    with pytest.raises(TuneError, match=f"the model search 'g' tuned, {tuned}, is gone"):
        tuned_model({"model": str(tuned)}, opts, must_exist=True)
    # registered already (or nothing to register): a deleted checkpoint does not stop the rerun
    assert tuned_model({"model": str(tuned)}, opts, must_exist=False) == tuned


def test_a_seg_search_may_search_the_norm_and_a_bad_norm_is_refused_before_any_trial():
    from genseg.config import SegConfig
    from genseg.tuning import SearchSpace, SpaceError
    from jobs.tune import check_training_space

    check_training_space(SearchSpace.parse({"norm": ["bn", "ibn_a", "ibn_b"]}, "seg"), SegConfig(), "seg")
    with pytest.raises(SpaceError, match="field 'norm': value 'batch' cannot be used .*one of bn, ibn_a, ibn_b"):
        check_training_space(SearchSpace.parse({"norm": ["bn", "batch"]}, "seg"), SegConfig(), "seg")
