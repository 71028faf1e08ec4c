"""``genseg demo``: the whole project on built-in synthetic scenes, on a laptop, with no download.

It drives the public CLI (``jobs.cli.main``), the same commands a user types, and reads back the
``--json`` each one writes:

    prepare (Ray Data) -> train seg (2 Ray Train workers) -> eval seg
    [-> prepare + train seg again at the diffusion size, the scoring segmenter]
    -> train diffusion (2 workers) -> sample (a grid) -> eval gen (segmenter mIoU of the samples
    against the real-image ceiling, FD against its real-vs-real noise floor)
    -> tune the guidance weight (Ray Tune, 3 trials) -> train gan -> sample gan -> eval gen gan
    -> serve the segmenter and the diffusion model on Ray Serve and call each endpoint once

Generation is scored by a segmenter trained at the samples' resolution (the evaluation protocol,
docs/architecture.md).  The generative models work at ``diffusion_size(size)``, 32x48 for the
default 32x48 scenes, so one segmenter both demonstrates segmentation and scores the samples;
with larger scenes (``--size 64x96``) the same scenes are also rendered at 32x48 and a second,
scoring segmenter is trained there.  The defaults keep the whole demo near 8 minutes on 2 cores
(12 minutes with 64x96 scenes and the longer schedules measured on 2026-11-27).  The diffusion settings below were chosen by measuring
on 2 CPU cores (see DIFFUSION): a cosine schedule with v-prediction gives clean scenes in a few
hundred steps where the linear/eps default still leaves noise over the layout.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

DIFFUSION_MAX_PIXELS = 32 * 48    # the diffusion model (and the segmenter scoring it) work at most at this size

# segmenter: FCN-8s on the compact backbone, small enough for a few epochs on 2 cores
SEG = {"width": 16, "warmup_epochs": 0.5, "image_every": 2, "threads_per_worker": 1}
SEG_BATCH, SEG_LR = 4, 4e-3
SCORER_EPOCHS = 10                # the scoring segmenter at the samples' size, when one is needed

# Label-conditioned DDPM at 32x48.  Measured in one process on 2 cores with the same UNet, lr and EMA,
# 240 steps of 16 images on 240 scenes, DDIM x20, w=2, scored by a 32x48 FCN-8s (mIoU of 48 samples as
# a share of its mIoU on the real images): linear schedule + eps 95.6 %, cosine + eps 96.1 %, both with
# noise left over the layout; cosine + v-prediction 98.8 % with clean scenes (sky gradient, grass,
# road streaks), and still 98.8 % and clean at this demo's budget, 216 steps of 8 images on 144 scenes.
DIFFUSION = {"channels": "32,64,64", "schedule": "cosine", "prediction": "v_prediction", "p_uncond": 0.1,
             "ema_decay": 0.99, "lr": 2e-3, "sample_every": 1000, "sample_steps": 20, "guidance": 2.0,
             "threads_per_worker": 1}
DIFFUSION_BATCH = 4               # per worker: 2 workers x 4 = 8 images a step
SAMPLER, STEPS, GUIDANCE = "ddim", 20, 2.0
# A tiny label-conditioned DCGAN beside it (SPADE generator, spectral-norm discriminator, hinge
# loss), at the same size on the same scenes: one forward pass per image instead of 20 UNet calls.
GAN = {"g_channels": 16, "d_channels": 16, "z_dim": 32, "sample_every": 1000, "score_images": 96,
       "threads_per_worker": 1}
GAN_BATCH, GAN_LOSS = 8, "hinge"
GRID = 8                          # samples in the grid
TUNE_GUIDANCE = (0.0, 2.0, 4.0)   # the demo's guidance search: 3 trials
# The scenes the diffusion model learns from hold out 40 % as val: eval gen scores n = val / 2
# samples, and the real-vs-real noise floor compares the first n val images with the other n, so
# FD and its floor are measured at the same n (240 scenes: 144 train / 96 val, n = 48).
GEN_VAL_FRACTION = 0.4


class DemoStepFailed(RuntimeError):
    def __init__(self, step: str, rc: int):
        super().__init__(f"demo step '{step}' failed (exit {rc}); its message is above")
        self.rc = rc


def diffusion_size(size: tuple[int, int]) -> tuple[int, int]:
    """The scene size halved until it has at most DIFFUSION_MAX_PIXELS pixels, rounded down to multiples
    of 4 (three UNet levels): (64, 96) -> (32, 48), (32, 48) -> (32, 48), (128, 160) -> (32, 40)."""
    h, w = size
    while h * w > DIFFUSION_MAX_PIXELS and h >= 16 and w >= 16:
        h, w = h // 2, w // 2
    return max(8, h // 4 * 4), max(8, w // 4 * 4)


def _runtime_argv(rt) -> list[str]:
    argv = ["--workdir", str(rt.workdir), "--tracking-uri", rt.tracking_uri]
    return argv + (["--ray-address", rt.ray_address] if rt.ray_address else [])


def _sizes(s: tuple[int, int]) -> str:
    return f"{s[0]}x{s[1]}"


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _model_ref(summary: dict) -> str:
    """The registered version (``models:/name/version``), else the run's best checkpoint directory."""
    reg = summary.get("registered") or {}
    if reg.get("name") and reg.get("version") is not None:
        return f"models:/{reg['name']}/{reg['version']}"
    return str(summary["best_checkpoint"])


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _ms(v) -> str:
    return "n/a" if v is None else (f"{1000 * v:.1f} ms" if v < 1 else f"{v:.2f} s")


def _pm(v, std, fmt: str = ".3f") -> str:
    if v is None:
        return "n/a"
    return f"{v:{fmt}}" + ("" if std is None else f" +- {std:{fmt}}")


def generation_story(g: dict) -> list[str]:
    """The figures of an ``eval gen --json`` result, each with its n, spread and noise floor."""
    from genseg.metrics.generation import fd_difference_resolved

    n = g.get("n") or (g.get("protocol") or {}).get("samples")
    lines = []
    if g.get("seg_miou_samples") is not None:
        ceiling = g.get("seg_miou_real_ceiling")
        frac = g.get("seg_miou_fraction_of_ceiling")
        if frac is None and ceiling:
            frac = g["seg_miou_samples"] / ceiling
        lines.append(f"segmenter mIoU on the samples {_pct(g['seg_miou_samples'])} against {_pct(ceiling)} on the "
                     f"real images (the ceiling): {_pct(frac)} % of it (n={n})")
    floor = g.get("noise_floor") or {}
    fd_line = f"FD {_pm(g.get('fd'), g.get('fd_std'))} (bootstrap std, n={n})"
    if floor.get("fd") is not None:
        fd_line += f"; real-vs-real floor {_pm(floor['fd'], floor.get('fd_std'))} (n={floor.get('n')})"
        if floor.get("n") == n:
            resolved = fd_difference_resolved(g["fd"], g.get("fd_std"), floor["fd"], floor.get("fd_std"))
            if not resolved:
                fd_line += ": within 2 std of it (unresolved), FD cannot tell these samples from real images at this n"
            else:
                fd_line += f": {'above' if g['fd'] > floor['fd'] else 'below'} it by more than 2 std"
    lines.append(fd_line)
    div, fdiv = g.get("diversity"), floor.get("diversity")
    if div:
        lines.append(f"diversity: recall {div['recall']:.2f}, coverage {div['coverage']:.2f}"
                     + ("" if not fdiv else f" (real-vs-real {fdiv['recall']:.2f}, {fdiv['coverage']:.2f}); "
                        f"a collapsed generator drives both toward 0"))
    if g.get("kid") is not None:
        kid_floor = floor.get("kid")
        lines.append(f"KID {_pm(g['kid'], g.get('kid_std'), '.4f')}"
                     + ("" if kid_floor is None else f"; real-vs-real floor {kid_floor:.4f}"))
    return lines


def side_by_side(diffusion_samples: Path, gan_samples: Path, out: Path) -> Path | None:
    """One picture: label map | diffusion sample | GAN sample, on the same val label maps
    (both sample directories were drawn from the same --masks in the same order)."""
    import numpy as np
    from PIL import Image

    from genseg.viz import save_png, stack_rows, upscale
    from jobs.sample_job import GRID_MIN_WIDTH

    rows = []
    for i in range(GRID):
        label, diff, gan = (d / f"{kind}_{i:04d}.png" for d, kind in
                            ((diffusion_samples, "label"), (diffusion_samples, "sample"), (gan_samples, "sample")))
        if not (label.is_file() and diff.is_file() and gan.is_file()):
            break
        rows.append(np.concatenate([np.asarray(Image.open(p).convert("RGB")) for p in (label, diff, gan)], axis=1))
    if not rows:
        return None
    half = (len(rows) + 1) // 2          # two columns of rows keep the picture from being a tall strip
    left, right = stack_rows(rows[:half]), stack_rows(rows[half:] or [np.full_like(rows[0], 255)])
    if right.shape[0] < left.shape[0]:
        right = np.concatenate([right, np.full((left.shape[0] - right.shape[0], *right.shape[1:]), 255, np.uint8)])
    pad = np.full((left.shape[0], 4, 3), 255, np.uint8)
    return save_png(upscale(np.concatenate([left, pad, right], axis=1), GRID_MIN_WIDTH), out)


def serve_and_call(rt, seg_ref: str, gen_ref: str, size: tuple[int, int], demo_dir: Path, keep_serving: bool,
                   port: int = 8000) -> dict:
    """``genseg serve`` on the demo's models; one request to each endpoint, printed; then stop
    (or, with ``keep_serving``, stay up until Ctrl-C)."""
    import io

    import numpy as np
    import requests
    from PIL import Image

    from genseg.data.synthetic import make_scene
    from serve_app import server
    from serve_app.options import AppOptions

    image, labels = make_scene(7, 0, *size)
    calls: dict = {}

    def png(a) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    def call(name, method, url, **kw):
        t0 = time.perf_counter()
        r = requests.request(method, url, timeout=300, **kw)
        calls[name] = {"status": r.status_code, "ms": 1000 * (time.perf_counter() - t0),
                       "model": r.headers.get("X-Genseg-Model")}
        if r.status_code != 200:
            raise RuntimeError(f"{method} {url} -> {r.status_code}: {r.text[:200]}")
        return r

    def on_ready(url: str) -> None:
        models = call("models", "GET", url + "v1/models").json()
        print(f"      GET  {url}v1/models -> segmenter {models['segmenter']['name']} v{models['segmenter']['version']}, "
              f"generator {models['generator']['name']} v{models['generator']['version']} "
              f"({models['generator']['sampling_desc']})", flush=True)
        seg = call("segment", "POST", url + "v1/segment?format=json", files={"image": ("scene.png", png(image))}).json()
        shares = ", ".join(f"{c['name']} {100 * c['share']:.0f} %" for c in seg["classes"] if c["share"] >= 0.05)
        print(f"      POST {url}v1/segment -> {shares} [{calls['segment']['ms']:.0f} ms]", flush=True)
        r = call("synthesize", "POST", url + "v1/synthesize", files={"label_map": ("labels.png", png(labels))},
                 data={"params": json.dumps({"seed": 1})})
        (demo_dir / "served_synthesis.png").write_bytes(r.content)
        print(f"      POST {url}v1/synthesize -> {demo_dir / 'served_synthesis.png'} "
              f"[{calls['synthesize']['ms']:.0f} ms]", flush=True)
        # remove the smallest object the segmenter found (a car or a person where it sees one)
        found = sorted((c for c in seg["classes"] if c["share"] > 0), key=lambda c: c["share"])
        target = next((c["name"] for c in found if c["name"] not in ("sky", "ground", "road")), found[0]["name"])
        r = call("edit", "POST", url + "v1/edit", files={"image": ("scene.png", png(image))},
                 data={"params": json.dumps({"operation": "remove", "classes": [target], "seed": 1})})
        (demo_dir / "served_edit.png").write_bytes(r.content)
        print(f"      POST {url}v1/edit (remove {target}) -> {demo_dir / 'served_edit.png'}, "
              f"{r.headers.get('X-Genseg-Edited-Pixels')} pixels changed [{calls['edit']['ms']:.0f} ms]", flush=True)
        calls["url"] = url
        if keep_serving:
            print(f"      the web page: {url} (Ctrl-C to stop)", flush=True)

    opts = AppOptions(segmenter=seg_ref, generator=gen_ref, poll_interval_s=0)
    server.run(rt, opts, port=server.free_port(preferred=port), on_ready=on_ready, block=keep_serving)
    return calls


def run(rt, epochs: int = 8, num: int = 240, size: tuple[int, int] = (32, 48), diffusion_epochs: int = 10,
        gan_epochs: int = 10, keep_serving: bool = False) -> int:
    from jobs import cli

    t_start = time.perf_counter()
    demo_dir = rt.workdir / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = _runtime_argv(rt)
    verbose = ["-v"] if getattr(rt, "verbose", False) else []
    dsize = diffusion_size(size)
    separate_scorer = tuple(dsize) != tuple(size)
    total = (8 if separate_scorer else 6) + 5
    timings: dict[str, float] = {}
    counter = [0]

    def step(name: str, story: str, argv: list[str]) -> None:
        counter[0] += 1
        print(f"\n[{counter[0]}/{total}] {story}\n      $ genseg {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        rc = cli.main(verbose + argv + common)
        timings[name] = time.perf_counter() - t0
        if rc:
            raise DemoStepFailed(name, rc)

    def say(text: str) -> None:
        print(f"  ->  {text} [{timings[list(timings)[-1]]:.0f}s]", flush=True)

    try:
        # 1. data
        shards = demo_dir / "shards"
        held_out = [] if separate_scorer else ["--val-fraction", str(GEN_VAL_FRACTION)]
        step("prepare", f"{num} synthetic scenes at {_sizes(size)} -> Parquet shards (Ray Data)",
             ["prepare", "--source", "synthetic", "--num", str(num), "--size", _sizes(size), "--out", str(shards),
              *held_out])
        manifest = _read(shards / "manifest.json")
        splits = manifest.get("splits", {})
        say(f"{splits.get('train', {}).get('count')} train / {splits.get('val', {}).get('count')} val scenes, "
            f"{manifest.get('num_classes')} classes: {', '.join(manifest.get('classes', {}).get('names', []))}")

        # 2-3. segmentation
        seg_json = demo_dir / "train_seg.json"
        seg_argv = ["--arch", "fcn8s", "--backbone", "compact", "--batch-size", str(SEG_BATCH), "--lr", str(SEG_LR)]
        seg_argv += [a for k, v in SEG.items() for a in ("--set", f"{k}={v}")]
        step("train seg", f"FCN-8s on 2 Ray Train workers for {epochs} epochs at {_sizes(size)} (MLflow: genseg-seg)",
             ["train", "seg", "--data", str(shards), "--workers", "2", "--epochs", str(epochs), *seg_argv,
              "--run-name", f"demo-seg-{stamp}", "--json", str(seg_json)])
        seg = _read(seg_json)
        seg_ref = _model_ref(seg)
        say(f"best val mIoU {_pct(seg.get('best_score'))} at epoch {seg.get('best_epoch', 0) + 1}; {seg_ref}")

        eval_json = demo_dir / "eval_seg.json"
        step("eval seg", f"evaluating {seg_ref} on the val split at the masks' own resolution",
             ["eval", "seg", "--model", seg_ref, "--data", str(shards), "--split", "val", "--json", str(eval_json)])
        ev = _read(eval_json)
        say(f"val mIoU {_pct(ev.get('miou'))}, pixel accuracy {_pct(ev.get('pixel_acc'))} % "
            f"on {ev.get('images')} images")

        # the segmenter that scores samples must work at the samples' resolution
        gen_shards, scorer_ref, scorer = shards, seg_ref, seg
        if separate_scorer:
            gen_shards = demo_dir / f"shards-{_sizes(dsize)}"
            step("prepare small", f"the same {num} scenes rendered at {_sizes(dsize)}, the diffusion model's size",
                 ["prepare", "--source", "synthetic", "--num", str(num), "--size", _sizes(dsize),
                  "--val-fraction", str(GEN_VAL_FRACTION), "--out", str(gen_shards)])
            counts = _read(gen_shards / "manifest.json").get("splits", {})
            say(f"{counts.get('train', {}).get('count')} train / {counts.get('val', {}).get('count')} val scenes "
                f"in {gen_shards}")
            scorer_json = demo_dir / "train_scorer.json"
            step("train scorer",
                 f"a scoring FCN-8s at {_sizes(dsize)} for {SCORER_EPOCHS} epochs: samples are scored by a "
                 f"segmenter trained at their resolution",
                 ["train", "seg", "--data", str(gen_shards), "--workers", "2", "--epochs", str(SCORER_EPOCHS),
                  *seg_argv, "--run-name", f"demo-scorer-{stamp}", "--json", str(scorer_json)])
            scorer = _read(scorer_json)
            scorer_ref = _model_ref(scorer)
            say(f"scoring segmenter: val mIoU {_pct(scorer.get('best_score'))} at {_sizes(dsize)}; {scorer_ref}")

        # 4. diffusion
        diff_json = demo_dir / "train_diffusion.json"
        dset = {"image_size": _sizes(dsize), **DIFFUSION}
        step("train diffusion",
             f"label-conditioned DDPM at {_sizes(dsize)} (UNet {DIFFUSION['channels'].replace(',', '/')}, "
             f"{DIFFUSION['schedule']} schedule, {DIFFUSION['prediction']}) on 2 workers for {diffusion_epochs} "
             f"epochs (MLflow: genseg-diffusion)",
             ["train", "diffusion", "--data", str(gen_shards), "--cond", "mask", "--workers", "2",
              "--epochs", str(diffusion_epochs), "--batch-size", str(DIFFUSION_BATCH),
              *[a for k, v in dset.items() for a in ("--set", f"{k}={v}")],
              "--run-name", f"demo-diffusion-{stamp}", "--json", str(diff_json)])
        diff = _read(diff_json)
        diff_ref = _model_ref(diff)
        say(f"best {diff.get('score', 'score')} {_pm(diff.get('best_score'), None, '.4f')} at epoch "
            f"{diff.get('best_epoch', 0) + 1}; "
            f"{diff_ref}")

        # 5. samples
        samples_dir = demo_dir / "samples"
        step("sample", f"{GRID} samples on val label maps ({SAMPLER} x{STEPS}, w={GUIDANCE}) -> {samples_dir}",
             ["sample", "--model", diff_ref, "--num", str(GRID), "--masks", str(gen_shards), "--sampler", SAMPLER,
              "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--out", str(samples_dir)])
        grid = _read(samples_dir / "samples.json").get("grid") or str(samples_dir / "grid.png")
        say(f"{grid} (rows of label map | sample)")

        # 6. generation quality
        gen_json = demo_dir / "eval_gen.json"
        n_val = (_read(gen_shards / "manifest.json").get("splits", {}).get("val", {}) or {}).get("count") or 4
        n_gen = max(2, n_val // 2)
        step("eval gen", f"scoring {n_gen} samples with {scorer_ref} (trained at {_sizes(dsize)}) against "
                         f"{n_gen} real val images; the noise floor from {n_gen} other real ones",
             ["eval", "gen", "--model", diff_ref, "--segmenter", scorer_ref, "--data", str(gen_shards),
              "--num", str(n_gen), "--sampler", SAMPLER, "--steps", str(STEPS), "--guidance", str(GUIDANCE),
              "--json", str(gen_json)])
        for line in generation_story(_read(gen_json)):
            print(f"      {line}")

        # 6b. a small guidance-weight search on Ray Tune (no training): the winner is registered with its
        # sampling settings, which `sample` and `edit` then use by default
        space = demo_dir / "tune_space.yaml"
        space.write_text("sampling:\n  guidance: [%s]\n  sampler: [%s]\n  steps: [%d]\n"
                         % (", ".join(str(w) for w in TUNE_GUIDANCE), SAMPLER, STEPS))
        tune_json = demo_dir / "tune.json"
        step("tune guidance",
             f"Ray Tune: guidance weight w in {list(TUNE_GUIDANCE)} ({SAMPLER} x{STEPS}), {n_gen} samples per trial, "
             f"scored by FD with a segmenter-mIoU constraint",
             ["tune", "diffusion", "--stage", "sampling", "--model", diff_ref, "--segmenter", scorer_ref,
              "--data", str(gen_shards), "--space", str(space), "--num", str(n_gen), "--name", f"demo-tune-{stamp}",
              "--json", str(tune_json)])
        tuned = _read(tune_json)
        reg = tuned.get("registered")
        # serve the tuned version (its sampling settings are the served defaults) when the search registered one
        served_ref = f"models:/{reg['name']}/{reg['version']}" if reg and reg.get("version") else diff_ref
        say(f"tuned sampling {tuned.get('best_sampling')}; "
            + (f"registered as {reg.get('name')} version {reg.get('version')}" if reg else
               "the model's own settings won, so nothing was registered"))

        # 7. a GAN on the same scenes, its samples on the same label maps, scored the same way
        gan_json = demo_dir / "train_gan.json"
        gset = {"image_size": _sizes(dsize), **GAN}
        step("train gan",
             f"label-conditioned DCGAN at {_sizes(dsize)} ({GAN_LOSS} loss, SPADE generator, spectral-norm "
             f"discriminator) on 2 workers for {gan_epochs} epochs (MLflow: genseg-gan)",
             ["train", "gan", "--data", str(gen_shards), "--cond", "mask", "--workers", "2", "--epochs", str(gan_epochs),
              "--batch-size", str(GAN_BATCH), "--loss", GAN_LOSS, *[a for k, v in gset.items() for a in ("--set", f"{k}={v}")],
              "--run-name", f"demo-gan-{stamp}", "--json", str(gan_json)])
        gan = _read(gan_json)
        gan_ref = _model_ref(gan)
        say(f"best val FD in random features {_pm(gan.get('best_score'), None, '.4f')} at epoch "
            f"{gan.get('best_epoch', 0) + 1}; {gan_ref}")
        gan_samples = demo_dir / "samples-gan"
        step("sample gan", f"{GRID} GAN samples on the same val label maps -> {gan_samples}",
             ["sample", "--model", gan_ref, "--num", str(GRID), "--masks", str(gen_shards), "--out", str(gan_samples)])
        both = side_by_side(samples_dir, gan_samples, demo_dir / "gan_vs_diffusion.png")
        gs = _read(gan_samples / "samples.json")
        ds = _read(samples_dir / "samples.json")
        say(f"{both} (label map | diffusion | GAN); {_ms(ds.get('seconds_per_image'))} per image for diffusion "
            f"({SAMPLER} x{STEPS}), {_ms(gs.get('seconds_per_image'))} for the GAN")
        gan_eval = demo_dir / "eval_gen_gan.json"
        step("eval gen gan", f"the GAN scored like the diffusion model: {n_gen} samples, the same segmenter and floor",
             ["eval", "gen", "--model", gan_ref, "--segmenter", scorer_ref, "--data", str(gen_shards),
              "--num", str(n_gen), "--json", str(gan_eval)])
        for line in generation_story(_read(gan_eval)):
            print(f"      {line}")

        # 8. serving: the same models behind the HTTP API, one request to each endpoint
        counter[0] += 1
        print(f"\n[{counter[0]}/{total}] Ray Serve: the segmenter and the diffusion model as autoscaling replicas "
              f"behind the HTTP API on 127.0.0.1\n      $ genseg serve --segmenter {scorer_ref} --generator "
              f"{served_ref}", flush=True)
        t0 = time.perf_counter()
        served = serve_and_call(rt, scorer_ref, served_ref, dsize, demo_dir, keep_serving)
        timings["serve"] = time.perf_counter() - t0
        say(f"served at {served.get('url')}; all four endpoints answered 200"
            + ("" if keep_serving else " (stopped; --keep-serving leaves it up)"))
    except DemoStepFailed as exc:
        print(f"\ngenseg demo: {exc}")
        return exc.rc

    took = time.perf_counter() - t_start
    steps = ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
    again = (f"--model {diff_ref} --num 8 --masks {gen_shards} --guidance 4 --out {demo_dir / 'samples-w4'} "
             f"--workdir {rt.workdir}")
    print(f"""
done in {took:.0f}s ({steps}). What was made:
  shards            {shards}{'' if not separate_scorer else f' and {gen_shards}'}
  segmenter         {seg.get('best_checkpoint')} ({seg_ref}; MLflow run {seg.get('mlflow_run_id')})
  evaluation        {eval_json}
  scoring segmenter {scorer_ref} (trained at {_sizes(dsize)})
  diffusion model   {diff.get('best_checkpoint')} ({diff_ref})
  samples           {grid}
  generation scores {gen_json}
  guidance search   {tune_json} (best {tuned.get('best_sampling')})
  GAN               {gan.get('best_checkpoint')} ({gan_ref}); samples {gan_samples / 'grid.png'}; scores {gan_eval}
  side by side      {both}
  served            {demo_dir / 'served_synthesis.png'}, {demo_dir / 'served_edit.png'}
Open the tracking UI with:
  .venv/bin/mlflow ui --backend-store-uri {rt.tracking_uri}
Sample again, with another guidance weight:
  .venv/bin/genseg sample {again}
Serve the models with the web page at http://127.0.0.1:8000/ :
  .venv/bin/genseg serve --segmenter {scorer_ref} --generator {served_ref} --workdir {rt.workdir}""")
    return 0
