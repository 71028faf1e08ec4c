"""The Serve app over real HTTP on 127.0.0.1: `serve.run` of the real application with tiny models
from a real sqlite MLflow registry, on the session's local Ray."""
import io
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from genseg import checkpoint as ck
from genseg import tracking
from genseg.config import DiffusionConfig, SegConfig
from genseg.editing import dilate
from genseg.loading import load
from genseg.models import build_segmenter
from genseg.models.unet import build_diffusion_model
from serve_app.server import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLASSES = {"names": ["sky", "road", "car"], "palette": [[135, 190, 235], [90, 90, 95], [220, 200, 30]]}
GEN_SIZE = (16, 20)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def biased_segmenter(cfg):
    """A second segmenter version whose output is easy to tell apart: every pixel is class 2."""
    torch.manual_seed(0)
    net = build_segmenter(cfg)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d) and m.out_channels == cfg.num_classes and m.bias is not None:
                m.bias[2] += 1e4
    return net


def register(uri, workdir, path, model_name, kind, score, promote=False):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = tracking.experiment_id(f"test-{kind}", workdir)
    run = client.create_run(exp)
    out = tracking.save_pyfunc(path, Path(workdir) / f"model-{run.info.run_id}", kind)
    client.log_artifacts(run.info.run_id, str(out), "model")
    return tracking.register(run.info.run_id, "model", model_name, tracking.Score("val_miou", score),
                             data_fingerprint="testdata", scored_on="val", promote=promote, tracking_uri=uri)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracking.setup(root, uri)
    torch.manual_seed(0)
    scfg = SegConfig(num_classes=3, width=8)
    seg1 = ck.save(root / "seg1", build_segmenter(scfg), scfg, epoch=0, classes=CLASSES)
    dcfg = DiffusionConfig(num_classes=3, channels=(8, 16), image_size=GEN_SIZE, timesteps=50, sample_steps=2,
                           sampler="ddim", guidance=1.5)
    gen = ck.save(root / "gen", build_diffusion_model(dcfg), dcfg, epoch=0, classes=CLASSES)
    assert register(uri, root, seg1, "genseg-segmenter", "segmenter", 0.5)["champion"]
    assert register(uri, root, gen, "genseg-diffusion", "diffusion", 0.1)["champion"]
    return {"root": root, "uri": uri, "seg1": seg1, "gen": gen, "scfg": scfg}


def APP_ARGS(store) -> dict:
    return {"tracking_uri": store["uri"], "workdir": str(store["root"]), "poll_interval_s": 1,
            "max_pixels": 200 * 200, "max_upload_bytes": 400_000, "max_steps": 20, "max_batch_size": 4,
            "batch_wait_timeout_s": 0.05}


def deploy(config: dict, timeout: float = 240) -> None:
    """What `serve deploy config.yaml` does: the declarative REST API of the local Ray's dashboard."""
    import os

    from ray import serve
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    ServeSubmissionClient(os.environ["RAY_API_SERVER_ADDRESS"]).deploy_applications(config)
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(1)
        app = serve.status().applications.get("genseg")
        if app is not None and app.status == "RUNNING" and all(
                d.status == "HEALTHY" for d in app.deployments.values()):
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            pytest.fail(f"deploy failed: {app.message}")
    pytest.fail(f"the app did not become healthy within {timeout} s: {serve.status()}")


def config_for(store, port: int, segmenter_user_config: dict | None = None) -> dict:
    """serve_app/config.yaml as shipped, with the test's port, registry, limits and a 1 s poll."""
    import yaml

    config = yaml.safe_load((Path(__file__).parents[2] / "serve_app" / "config.yaml").read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"] = APP_ARGS(store)
    for d in app["deployments"]:
        if d["name"] == "Segmenter":
            d["user_config"] = segmenter_user_config or {"poll_interval_s": 1, "max_batch_size": 4}
            # one replica, always: the tests compare replica PIDs before and after a reconfigure, and
            # an earlier test's load must not leave a second replica starting (autoscaling is measured
            # in bench/serve_load.py).  A config's num_replicas does not do it: Serve keeps the
            # decorator's autoscaling_config (max_replicas 2) beside it, so the bound goes in there.
            d["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1}
        elif d["name"] == "Generator":
            d["user_config"] = {"poll_interval_s": 1}
    return config


@pytest.fixture(scope="module")
def app(ray_cluster, store):
    import os

    from ray import serve
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    port = free_port(preferred=0)
    deploy(config_for(store, port))
    details = ServeSubmissionClient(os.environ["RAY_API_SERVER_ADDRESS"]).get_serve_details()
    assert details["applications"]["genseg"]["deployments"]["Segmenter"]["deployment_config"][
        "autoscaling_config"]["max_replicas"] == 1          # the PID comparisons below rely on it
    yield {"url": f"http://127.0.0.1:{port}", "port": port, **store}
    serve.shutdown()


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)


def local(store, which):
    return load(store[which])


def seg_ok(app, image):
    """The good request that must succeed after each bad one."""
    r = requests.post(app["url"] + "/v1/segment", files={"image": ("a.png", png(image))}, timeout=60)
    assert r.status_code == 200, r.text
    assert decode(r.content).shape == image.shape[:2]


# ------------------------------------------------------------------ happy paths, with values

def test_segment_returns_the_models_label_map(app, image):
    r = requests.post(app["url"] + "/v1/segment", files={"image": ("a.png", png(image))},
                      headers={"X-Request-Id": "test-segment-0001"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    labels = decode(r.content)
    expected = local(app, "seg1").segment(image)
    assert labels.shape == (40, 50) and np.array_equal(labels, expected)
    assert r.headers["x-genseg-model"] == "genseg-segmenter/1"
    assert r.headers["x-request-id"] == "test-segment-0001"

    r = requests.post(app["url"] + "/v1/segment?format=json&overlay=1", files={"image": ("a.png", png(image))},
                      timeout=60)
    body = r.json()
    shares = {c["name"]: c["share"] for c in body["classes"]}
    counts = np.bincount(expected.ravel(), minlength=3) / expected.size
    assert list(shares) == CLASSES["names"] and np.allclose(list(shares.values()), counts, atol=1e-5)
    assert np.array_equal(decode(__import__("base64").b64decode(body["label_map_png"])), expected)
    assert decode(__import__("base64").b64decode(body["overlay_png"])).shape == (40, 50, 3)


def test_concurrent_segmentations_share_batches_and_each_gets_its_own_label_map(app):
    """Batches form at the ingress (max 4 here); images of two sizes in one batch; every response
    must be its own image's label map, not a neighbour's."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (40, 50, 3) if i % 2 else (24, 36, 3), dtype=np.uint8) for i in range(8)]
    seg = local(app, "seg1")

    def post(im):
        r = requests.post(app["url"] + "/v1/segment", files={"image": ("a.png", png(im))}, timeout=60)
        assert r.status_code == 200, r.text
        return decode(r.content), int(r.headers["x-genseg-batch"])

    sizes = []
    for _ in range(3):
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(post, images))
        for im, (labels, _) in zip(images, results):   # a batched forward pass may flip a near-tie pixel
            expected = seg.segment(im)
            assert labels.shape == expected.shape and (labels == expected).mean() > 0.99
        sizes += [b for _, b in results]
        if max(sizes) > 1:
            break
    assert 1 < max(sizes) <= 4, sizes


def test_request_id_is_in_the_replica_logs(app, image):
    from jobs.runtime import ray_logs_dir

    test_segment_returns_the_models_label_map(app, image)
    logs = Path(ray_logs_dir()) / "serve"
    deadline = time.time() + 20
    while time.time() < deadline:
        if any("test-segment-0001" in f.read_text(errors="replace") for f in logs.glob("replica_genseg_*")):
            return
        time.sleep(1)
    pytest.fail("request id test-segment-0001 not found in the Serve replica logs")


def test_synthesize_is_seeded_and_the_models_size(app):
    lm = np.zeros(GEN_SIZE, np.uint8)
    lm[8:] = 1
    lm[10:14, 5:12] = 2
    post = lambda params: requests.post(app["url"] + "/v1/synthesize", files={"label_map": ("l.png", png(lm))},
                                        data={"params": json.dumps(params)}, timeout=120)
    a, b, c = post({"seed": 3, "steps": 3}), post({"seed": 3, "steps": 3}), post({"seed": 4, "steps": 3})
    assert a.status_code == 200, a.text
    img = decode(a.content)
    assert img.shape == (*GEN_SIZE, 3)
    assert a.content == b.content and a.content != c.content
    assert json.loads(a.headers["x-genseg-sampling"]) == {"sampler": "ddim", "steps": 3, "guidance": 1.5}
    assert a.headers["x-genseg-model"] == "genseg-diffusion/1"
    ref = load(app["gen"]).generate(torch.from_numpy(lm.astype(np.int64))[None], 1, 3, steps=3)[0].numpy()
    assert np.abs(ref.astype(int) - img.astype(int)).mean() < 2.0
    # the same label map painted in the class colours (what the web page sends) gives the same image
    colours = np.asarray(CLASSES["palette"], np.uint8)[lm]
    d = requests.post(app["url"] + "/v1/synthesize", files={"label_map": ("l.png", png(colours))},
                      data={"params": json.dumps({"seed": 3, "steps": 3})}, timeout=120)
    assert d.content == a.content


def test_edit_changes_only_the_selected_region(app, image):
    seg = local(app, "seg1")
    labels = seg.segment(image)
    cls = int(np.bincount(labels.ravel()).argmax())
    name = CLASSES["names"][cls]
    region = dilate(labels == cls, 1)
    r = requests.post(app["url"] + "/v1/edit", files={"image": ("a.png", png(image))},
                      data={"params": json.dumps({"operation": "remove", "classes": [name], "dilate": 1,
                                                  "steps": 2, "seed": 1})}, timeout=120)
    assert r.status_code == 200, r.text
    out = decode(r.content)
    assert out.shape == image.shape
    assert int(r.headers["x-genseg-edited-pixels"]) == int(region.sum()) > 0
    assert np.array_equal(out[~region], image[~region])
    assert not np.array_equal(out[region], image[region])
    assert r.headers["x-genseg-generator"] == "genseg-diffusion/1"

    keep = CLASSES["names"][cls]
    r = requests.post(app["url"] + "/v1/edit", files={"image": ("a.png", png(image))},
                      data={"params": json.dumps({"operation": "replace_background", "keep": [keep], "steps": 2})},
                      timeout=120)
    out = decode(r.content)
    assert r.status_code == 200 and np.array_equal(out[labels == cls], image[labels == cls])


def test_models_and_health(app):
    body = requests.get(app["url"] + "/v1/models", timeout=30).json()
    assert body["segmenter"]["name"] == "genseg-segmenter" and body["segmenter"]["version"] >= 1
    assert body["generator"]["sampling"] == {"sampler": "ddim", "steps": 2, "guidance": 1.5}
    assert body["generator"]["image_size"] == list(GEN_SIZE) and body["limits"]["max_steps"] == 20
    assert requests.get(app["url"] + "/healthz", timeout=30).json()["status"] == "ok"
    assert "/v1/segment" in requests.get(app["url"] + "/openapi.json", timeout=30).json()["paths"]
    page = requests.get(app["url"] + "/", timeout=30)
    assert page.status_code == 200 and "<canvas" in page.text


# ------------------------------------------------------------------ bad input: 4xx JSON, then a good request

def _truncated_png(image):
    data = png(image)
    return data[: len(data) // 2]


LM = np.zeros(GEN_SIZE, np.uint8)


def _bad_cases(image):
    big = np.zeros((300, 300, 3), np.uint8)
    noisy = np.random.default_rng(1).integers(0, 255, (360, 360, 3), dtype=np.uint8)   # ~390 kB as PNG
    seven = LM.copy()
    seven[0, 0] = 7
    synth = lambda params, lm=LM: ("/v1/synthesize", {"label_map": ("l.png", png(lm))}, {"params": params})
    edit = lambda params: ("/v1/edit", {"image": ("a.png", png(image))}, {"params": params})
    return [
        ("not an image", ("/v1/segment", {"image": ("a.txt", b"hello, not a picture")}, {}), 400,
         "not a readable image"),
        ("corrupt image", ("/v1/segment", {"image": ("a.png", _truncated_png(image))}, {}), 400, "image"),
        ("over the pixel limit", ("/v1/segment", {"image": ("a.png", png(big))}, {}), 413, "image: 300x300 pixels (width x height) is over the limit of 40,000 pixels"),
        ("over the byte limit", ("/v1/segment", {"image": ("a.png", png(noisy) * 2)}, {}), 413, "over the limit"),
        ("unknown class ids", synth("{}", seven), 422, "label values [7]"),
        ("wrong shape", synth("{}", np.zeros((10, 40), np.uint8)), 422, "does not fit"),
        ("unknown class name", edit('{"operation": "remove", "classes": ["unicorn"]}'), 422, "unknown class 'unicorn'"),
        ("malformed JSON", synth('{"steps": 3'), 400, "malformed JSON"),
        ("steps 0", synth('{"steps": 0}'), 422, "steps must be in 1..20"),
        ("steps 10^6", synth('{"steps": 1000000}'), 422, "steps must be in 1..20"),
        ("guidance NaN", synth('{"guidance": NaN}'), 422, "guidance must be a finite number"),
        ("unknown sampler", synth('{"sampler": "euler"}'), 422, "sampler 'euler' is unknown"),
        ("unknown param", synth('{"stepz": 3}'), 422, "unknown field(s) stepz"),
        ("missing file", ("/v1/segment", {}, {}), 422, "image"),
        ("unknown operation", edit('{"operation": "explode", "classes": ["car"]}'), 422, "operation must be"),
    ]


def test_every_bad_input_is_a_4xx_json_and_the_next_request_succeeds(app, image):
    for name, (path, files, data), status, text in _bad_cases(image):
        r = requests.post(app["url"] + path, files=files or None, data=data or None, timeout=60)
        assert r.status_code == status, (name, r.status_code, r.text)
        body = r.json()
        assert text in body["error"], (name, body)
        assert body["request_id"], name
        seg_ok(app, image)


def test_a_request_past_its_time_limit_gets_a_504(app, image):
    r = requests.post(app["url"] + "/v1/synthesize?timeout_s=0.001", files={"label_map": ("l.png", png(LM))},
                      data={"params": '{"steps": 20}'}, timeout=60)
    assert r.status_code == 504 and "did not finish within 0.001 s" in r.json()["error"]
    seg_ok(app, image)
    # a segmentation cut while its batch runs: the batch goes on for the others, and the next one works
    r = requests.post(app["url"] + "/v1/segment?timeout_s=0.001", files={"image": ("a.png", png(image))}, timeout=60)
    assert r.status_code == 504 and "segmentation did not finish" in r.json()["error"]
    seg_ok(app, image)


# ------------------------------------------------------------------ a new champion, noticed by the app

def test_a_moved_champion_is_served_without_dropping_requests(app, image):
    from jobs.runtime import ray_logs_dir

    statuses, stop = [], threading.Event()

    def hammer():
        while not stop.is_set():
            r = requests.post(app["url"] + "/v1/segment", files={"image": ("a.png", png(image))}, timeout=60)
            statuses.append((r.status_code, r.headers.get("x-genseg-model")))

    t = threading.Thread(target=hammer)
    t.start()
    try:
        time.sleep(1)
        v2 = ck.save(app["root"] / "seg2", biased_segmenter(app["scfg"]), app["scfg"], epoch=1, classes=CLASSES)
        res = register(app["uri"], app["root"], v2, "genseg-segmenter", "segmenter", 0.9)
        assert res["champion"] and res["version"] == 2
        deadline = time.time() + 60
        while time.time() < deadline and not any(m == "genseg-segmenter/2" for _, m in statuses[-3:]):
            time.sleep(0.5)
    finally:
        stop.set()
        t.join()
    assert statuses and all(s == 200 for s, _ in statuses), statuses
    assert statuses[0][1] == "genseg-segmenter/1" and statuses[-1][1] == "genseg-segmenter/2"
    r = requests.post(app["url"] + "/v1/segment", files={"image": ("a.png", png(image))}, timeout=60)
    assert (decode(r.content) == 2).all()           # the new version's output, not only its header
    body = requests.get(app["url"] + "/v1/models", timeout=30).json()
    assert body["segmenter"]["version"] == 2
    logs = "".join(f.read_text(errors="replace") for f in (Path(ray_logs_dir()) / "serve").glob("replica_genseg_Seg*"))
    assert "moved from version 1 to 2" in logs


def test_user_config_pins_a_version_without_a_restart(app, image):
    """`serve deploy` of the same config with only the Segmenter's user_config changed reaches the running
    replicas' reconfigure: they switch to the pinned version and stop following the alias."""
    before = {d["pid"] for d in _replicas("Segmenter")}
    deploy(config_for(app, app["port"], {"model": "models:/genseg-segmenter/1", "poll_interval_s": 0}))
    deadline = time.time() + 60
    while True:
        r = requests.post(app["url"] + "/v1/segment", files={"image": ("a.png", png(image))}, timeout=60)
        assert r.status_code == 200, r.text
        if r.headers["x-genseg-model"] == "genseg-segmenter/1" or time.time() > deadline:
            break
        time.sleep(0.5)
    assert r.headers["x-genseg-model"] == "genseg-segmenter/1"
    assert np.array_equal(decode(r.content), local(app, "seg1").segment(image))
    assert {d["pid"] for d in _replicas("Segmenter")} == before          # reconfigured, not restarted


def _replicas(deployment: str) -> list[dict]:
    from ray.util.state import list_actors

    return [{"pid": a.pid} for a in list_actors(filters=[("state", "=", "ALIVE")])
            if a.class_name == f"ServeReplica:genseg:{deployment}"]


# ------------------------------------------------------------------ the web page, in headless Chromium

CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (make test installs it)")
def test_web_page_segments_removes_and_synthesizes(app, image, tmp_path):
    from playwright.sync_api import sync_playwright

    picture = tmp_path / "street.png"
    picture.write_bytes(png(image))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(app["url"] + "/")
            page.wait_for_selector("#palette button")
            assert "genseg-segmenter v" in page.inner_text("#models")
            page.set_input_files("#image-file", str(picture))
            page.wait_for_selector("#overlay:not([hidden])")
            page.wait_for_selector("#legend input[type=checkbox]")
            assert page.eval_on_selector("#overlay", "i => i.naturalWidth") == 50
            names = page.eval_on_selector_all("#legend input", "xs => xs.map(x => x.value)")
            assert set(names) <= set(CLASSES["names"]) and names
            page.check(f"#legend input[value={names[0]}]")
            page.click("#remove-btn")
            page.wait_for_selector("#edited:not([hidden])", timeout=120_000)
            assert page.eval_on_selector("#edited", "i => [i.naturalWidth, i.naturalHeight]") == [50, 40]
            assert "edited" in page.inner_text("#status")
            page.click("#from-seg")
            page.click("#synth-btn")
            page.wait_for_selector("#synth:not([hidden])", timeout=120_000)
            assert page.eval_on_selector("#synth", "i => [i.naturalWidth, i.naturalHeight]") == [GEN_SIZE[1], GEN_SIZE[0]]
            assert "synthesized by genseg-diffusion/1" in page.inner_text("#status")
            assert not errors, errors
        finally:
            browser.close()


# ------------------------------------------------------------------ a latent diffusion model, unchanged

def test_a_latent_diffusion_model_is_served_like_a_pixel_one(app, image):
    """The same app with a latent model (autoencoder factor 2 + a DDPM on its 8x10 grid) as the generator:
    full-resolution synthesis equal to the model's own, and edits that keep every pixel outside the region.
    It redeploys the app, so it runs after the tests above."""
    from genseg import config as config_lib
    from genseg.config import VAEConfig
    from genseg.models.vae import build_vae

    root = app["root"]
    torch.manual_seed(1)
    vcfg = VAEConfig(channels=(8, 16), norm_groups=4, latent_channels=3, image_size=GEN_SIZE)
    dcfg = DiffusionConfig(num_classes=3, channels=(8, 16), image_size=(8, 10), timesteps=50, sample_steps=2,
                           sampler="ddim", guidance=1.5, latent_channels=3, latent_factor=2)
    ldm = ck.save(root / "ldm", build_diffusion_model(dcfg), dcfg, epoch=0, classes=CLASSES,
                  extra_meta={"vae": {"config": config_lib.asdict(vcfg), "latent_scale": 1.2}},
                  extra_weights={"vae": build_vae(vcfg)})
    assert register(app["uri"], root, ldm, "genseg-latent-diffusion", "diffusion", 0.1)["champion"]
    config = config_for(app, app["port"])
    config["applications"][0]["args"]["generator"] = "models:/genseg-latent-diffusion@champion"
    deploy(config)

    lm = np.zeros(GEN_SIZE, np.uint8)
    lm[8:] = 1
    lm[10:14, 5:12] = 2
    r = requests.post(app["url"] + "/v1/synthesize", files={"label_map": ("l.png", png(lm))},
                      data={"params": json.dumps({"seed": 3, "steps": 3})}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["x-genseg-model"] == "genseg-latent-diffusion/1"
    img = decode(r.content)
    assert img.shape == (*GEN_SIZE, 3)
    ref = load(ldm).generate(torch.from_numpy(lm.astype(np.int64))[None], 1, 3, steps=3)[0].numpy()
    assert np.abs(ref.astype(int) - img.astype(int)).mean() < 2.0

    labels = local(app, "seg1").segment(image)
    cls = int(np.bincount(labels.ravel()).argmax())
    r = requests.post(app["url"] + "/v1/edit", files={"image": ("a.png", png(image))},
                      data={"params": json.dumps({"operation": "remove", "classes": [CLASSES["names"][cls]],
                                                  "dilate": 1, "steps": 2, "seed": 1})}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["x-genseg-generator"] == "genseg-latent-diffusion/1"
    out, region = decode(r.content), dilate(labels == cls, 1)
    assert out.shape == image.shape and np.array_equal(out[~region], image[~region])
    assert not np.array_equal(out[region], image[region])


# ------------------------------------------------------------------ `genseg serve`, start to clean stop

def _genseg(*args, **kw):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=120, **kw)


def test_genseg_serve_refuses_a_busy_port_and_a_missing_model_before_starting_ray(store):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _genseg("serve", "--port", str(port), "--workdir", str(store["root"]), "--tracking-uri", store["uri"])
    assert r.returncode == 1 and f"127.0.0.1:{port} is in use" in r.stderr and "Traceback" not in r.stderr
    r = _genseg("serve", "--port", str(free_port(preferred=0)), "--segmenter", "models:/no-such-model@champion",
                "--workdir", str(store["root"]), "--tracking-uri", store["uri"])
    assert r.returncode == 1 and "models:/no-such-model@champion" in r.stderr and "not found" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_genseg_serve_answers_then_stops_cleanly_on_sigterm(store, tmp_path):
    import signal
    import subprocess
    import sys

    import psutil

    port = free_port(preferred=0)
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--port", str(port), "--workdir",
                                 str(store["root"]), "--tracking-uri", store["uri"], "--poll-interval", "0"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while "serving at" not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(1)
        assert "serving at" in log.read_text(), log.read_text()
        r = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30)
        assert r.status_code == 200 and r.json()["segmenter"].startswith("genseg-segmenter/")
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in " ".join(c.cmdline()) for c in children)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text()
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [(p.pid, p.cmdline()[:3]) for p in alive]
        assert "stopped" in log.read_text() and "Traceback" not in log.read_text()
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
