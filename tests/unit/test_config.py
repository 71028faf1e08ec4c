import dataclasses
import json

import pytest

from genseg import config as C
from genseg.config import ConfigError, DiffusionConfig, SegConfig

pytestmark = pytest.mark.unit


def test_json_round_trip_keeps_every_field():
    cfg = C.replace(SegConfig(), {"arch": "fcn16s", "crop": "64x96", "class_weights": "1,2.5,3",
                                  "num_classes": 3, "hflip": "false"})
    back = C.from_json(C.to_json(cfg))
    assert back == cfg
    assert back.crop == (64, 96) and back.class_weights == (1.0, 2.5, 3.0) and back.hflip is False


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="unknown config field.*learning_rate"):
        C.replace(SegConfig(), {"learning_rate": 0.1})


def test_bad_type_and_bad_choice_are_named():
    with pytest.raises(ConfigError, match="'epochs' expects int"):
        C.replace(SegConfig(), {"epochs": "ten"})
    with pytest.raises(ConfigError, match="'arch' must be one of"):
        C.replace(SegConfig(), {"arch": "fcn4s"})
    with pytest.raises(ConfigError, match="class_weights"):
        C.replace(SegConfig(), {"num_classes": 3, "class_weights": [1, 2]})


def test_yaml_preset_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nlr: 0.01\ncrop: [32, 48]\n")
    cfg = C.load_yaml(SegConfig, f)
    assert (cfg.epochs, cfg.lr, cfg.crop) == (7, 0.01, (32, 48))
    cfg = C.replace(cfg, C.parse_overrides(["lr=0.5", "backbone=resnet18"]))
    assert (cfg.lr, cfg.backbone, cfg.epochs) == (0.5, "resnet18", 7)
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*epochz"):
        C.load_yaml(SegConfig, bad)


def test_config_registry_names_every_config_class():
    # a config class missing from CONFIGS saves checkpoints that from_json cannot load back
    classes = {name for name, obj in vars(C).items()
               if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == C.__name__}
    assert classes == set(C.CONFIGS) and {"SegConfig", "DiffusionConfig"} <= classes


@pytest.mark.parametrize("name", sorted(C.CONFIGS))
def test_every_config_round_trips_through_checkpoint_json_with_tuples(name):
    # non-default values in every tuple field: JSON turns tuples into lists, and a list would
    # make the loaded config unequal to the saved one (and unhashable, and a different model)
    cls = C.CONFIGS[name]
    tuple_over = {"SegConfig": {"crop": [48, 64], "class_weights": [1, 2.5, 3, 1, 1, 1]},
                  "DiffusionConfig": {"image_size": [32, 48], "channels": [16, 32, 64]},
                  "GANConfig": {"image_size": [64, 80]},
                  "VAEConfig": {"image_size": [64, 80], "crop": [32, 48], "channels": [32, 64, 64]}}[name]
    tuple_fields = {f.name for f in dataclasses.fields(cls) if "tuple" in str(f.type)}
    assert tuple_fields == set(tuple_over)                # a new tuple field must be added above
    cfg = C.replace(cls(), tuple_over)
    text = C.to_json(cfg)                                 # json.dumps(asdict(cfg)): raises on non-JSON values
    stored = json.loads(text)["fields"]
    assert all(stored[f] == list(tuple_over[f]) for f in tuple_fields)   # lists on disk, tuples once loaded
    back = C.from_json(text)
    assert type(back) is cls and back == cfg and hash(back) == hash(cfg)
    for field in tuple_fields:
        assert isinstance(getattr(back, field), tuple), field


def test_replace_returns_a_new_config_and_leaves_the_original_unchanged():
    base = DiffusionConfig()
    new = C.replace(base, {"lr": "0.01", "channels": "16x32", "image_size": "32x48"})
    assert (new.lr, new.channels, new.image_size) == (0.01, (16, 32), (32, 48))
    assert base == DiffusionConfig() and (base.lr, base.channels, base.image_size) == (2e-4, (32, 64, 128), None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        new.lr = 1.0  # type: ignore[misc]
    # validation runs on the replaced copy too: 2 UNet levels need even sizes
    with pytest.raises(ConfigError, match="image_size"):
        C.replace(new, {"image_size": "31x48"})
    assert new.image_size == (32, 48)
