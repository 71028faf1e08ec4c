import pytest

from genseg import config as C
from genseg.config import ConfigError, SegConfig

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


def test_config_is_frozen():
    with pytest.raises(Exception):
        SegConfig().lr = 1.0  # type: ignore[misc]
