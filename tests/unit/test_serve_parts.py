"""The Serve app's plain-Python parts: options, the shipped config file, request decoding."""
import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from genseg import imageio
from genseg.data.classes import class_ids
from genseg.errors import InputError
from genseg.viz import overlay
from serve_app.options import AppOptions, OptionsError

pytestmark = pytest.mark.unit
CONFIG = Path(__file__).parents[2] / "serve_app" / "config.yaml"
PALETTE = [(10, 20, 30), (200, 0, 0), (0, 200, 0)]


def png(a, mode=None) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(a)
    if mode:
        im = im.convert(mode)
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_options_refuse_unknown_keys_and_bad_values_by_name():
    with pytest.raises(OptionsError, match="unknown serve option.*max_stepz"):
        AppOptions.from_dict({"max_stepz": 3})
    with pytest.raises(OptionsError, match="max_steps must be a whole number >= 1"):
        AppOptions.from_dict({"max_steps": 0})
    with pytest.raises(OptionsError, match="generate_timeout_s must be > 0"):
        AppOptions.from_dict({"generate_timeout_s": 0})
    with pytest.raises(OptionsError, match="max_guidance must be a finite number"):
        AppOptions.from_dict({"max_guidance": float("nan")})
    assert AppOptions.from_dict({"max_steps": "40", "poll_interval_s": "2.5"}).max_steps == 40


def test_resolved_options_give_replicas_an_absolute_registry(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opts = AppOptions(workdir="runs").resolved()
    assert opts.workdir == str(tmp_path / "runs") and opts.tracking_uri == f"sqlite:///{tmp_path / 'runs'}/mlflow.db"


def test_the_shipped_config_is_a_valid_serve_config_with_valid_app_args():
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(doc)
    app = schema.applications[0]
    assert app.import_path == "serve_app.app:build_app" and doc["http_options"]["host"] == "127.0.0.1"
    AppOptions.from_dict(app.args)                      # every arg is an option the app knows
    import inspect

    from serve_app.app import DEPLOYMENTS, build_app

    assert len(inspect.signature(build_app).parameters) == 1     # Serve calls an app builder with the args dict
    assert {d.name for d in app.deployments} == set(DEPLOYMENTS)
    for d in doc["applications"][0]["deployments"]:    # fits a 2-core machine: fractional CPUs, bounded replicas
        assert d["ray_actor_options"]["num_cpus"] < 1 and d["autoscaling_config"]["max_replicas"] <= 2


def test_label_maps_as_ids_or_as_class_colours():
    ids = np.array([[0, 1], [2, 255]], np.uint8)
    assert np.array_equal(imageio.read_label_map(png(ids), 3), ids)
    colours = np.array(PALETTE + [(0, 0, 0)], np.uint8)[[[0, 1], [2, 3]]]
    colours[1, 1] = PALETTE[0]
    got = imageio.read_label_map(png(colours), 3, palette=PALETTE)
    assert got.tolist() == [[0, 1], [2, 0]]
    with pytest.raises(imageio.ImageError, match="label values \\[7\\]"):
        imageio.read_label_map(png(np.array([[7, 0]], np.uint8)), 3)
    off = colours.copy()
    off[0, 0] = (11, 20, 30)                             # one colour a browser blend would make
    with pytest.raises(imageio.ImageError, match="1 pixels have colours that are not in the label set's palette"):
        imageio.read_label_map(png(off), 3, palette=PALETTE)
    with pytest.raises(imageio.ImageError, match="single-channel PNG"):
        imageio.read_label_map(png(colours), 3)          # RGB without a palette to read it by


def test_images_over_the_pixel_limit_are_refused_before_decoding():
    data = png(np.zeros((30, 40, 3), np.uint8))
    assert imageio.read_image(data, max_pixels=1200).shape == (30, 40, 3)
    with pytest.raises(imageio.ImageError, match=r"^image: 40x30 pixels \(width x height\) is over the limit of 1,199 pixels"):
        imageio.read_image(data, max_pixels=1199)
    with pytest.raises(imageio.ImageError, match="unknown format or corrupt data"):
        imageio.read_image(b"GIF89a garbage")
    with pytest.raises(imageio.ImageError, match="truncated"):
        imageio.read_image(png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))[:400])


def test_class_ids_by_name_or_number():
    names = ["sky", "Road", "car"]
    assert class_ids("road, 2", names) == [1, 2] and class_ids(["CAR", 0], names) == [2, 0]
    with pytest.raises(InputError, match="unknown class 'bus'; the segmenter knows: sky, Road, car"):
        class_ids(["bus"], names)
    with pytest.raises(InputError, match="no classes given"):
        class_ids("", names)


def test_overlay_blends_class_colours_and_leaves_ignored_pixels():
    image = np.full((2, 2, 3), 100, np.uint8)
    labels = np.array([[1, 255], [0, 2]])
    out = overlay(image, labels, PALETTE, alpha=0.5)
    assert out[0, 0].tolist() == [150, 50, 50] and out[0, 1].tolist() == [100, 100, 100]


def test_a_gan_is_served_through_the_same_generator_deployment(tmp_path):
    """The Generator deployment's class (without Serve) on a GAN checkpoint: one-pass generation and
    inpainting by inversion; the API refuses diffusion-only parameters for it with a 422."""
    import torch

    from genseg import checkpoint as ck
    from genseg.config import GANConfig
    from genseg.generation import SamplingError
    from genseg.models.dcgan import build_generator
    from serve_app.api import ApiError, _sampling
    from serve_app.deployments import GeneratorDeployment

    cfg = GANConfig(image_size=(16, 24), num_classes=3, g_channels=8, d_channels=8, z_dim=16)
    torch.manual_seed(0)
    path = ck.save(tmp_path / "gan", build_generator(cfg), cfg, epoch=0, classes={"names": ["a", "b", "c"]})
    dep = GeneratorDeployment.func_or_class(str(path), f"sqlite:///{tmp_path}/mlflow.db", 1, 0)
    labels = np.zeros((16, 24), np.int64)
    labels[8:] = 2
    img, tag, used = dep.generate(labels, 3, {})
    again, _, _ = dep.generate(labels, 3, {})
    assert img.shape == (16, 24, 3) and np.array_equal(img, again) and used == {"truncation": 0.0}
    assert tag == str(path)
    with pytest.raises(SamplingError, match="GAN"):
        dep.generate(labels, 3, {"steps": 3})
    image = torch.from_numpy(np.full((1, 16, 24, 3), 90, np.uint8))
    hole = torch.zeros(1, 16, 24, dtype=torch.bool)
    hole[:, 4:8, 4:10] = True
    out, _, _ = dep.inpaint(image, hole, torch.from_numpy(labels)[None], 0, 1, {})
    assert torch.equal(out[~hole], image[~hole])
    dep.check_health()
    info = dep.describe()
    assert info["kind"] == "gan" and info["sampling"] == {"truncation": 0.0}
    with pytest.raises(ApiError, match="the served generator is a GAN") as e:
        _sampling({"guidance": 2.0}, info, AppOptions())
    assert e.value.status == 422
    assert _sampling({"truncation": 1.5}, info, AppOptions()) == {"truncation": 1.5}
