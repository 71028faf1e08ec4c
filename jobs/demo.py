"""``genseg demo``: the whole segmentation path on built-in synthetic data, on a laptop.

synthetic shards (Ray Data) -> 2-worker FCN-8s training (Ray Train, MLflow) -> registry
champion -> evaluation at the masks' own resolution.  Needs no download and no flags.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from genseg import config as config_lib
from genseg.config import DiffusionConfig, SegConfig


def run(rt, epochs: int = 6, num: int = 240, size: tuple[int, int] = (64, 96), diffusion_epochs: int = 12) -> int:
    from genseg import tracking
    from jobs import eval_seg, sample_job, train_diffusion, train_seg
    from jobs.runtime import init_ray
    from pipelines import sources
    from pipelines.prepare import prepare

    t0 = time.perf_counter()
    demo_dir = rt.workdir / "demo"
    shards = demo_dir / "shards"
    print(f"[1/5] preparing {num} synthetic scenes of {size[0]}x{size[1]} with Ray Data -> {shards}")
    init_ray(rt)
    manifest = prepare(sources.synthetic(num, size, seed=0), shards,
                       description={"source": "synthetic", "num": num, "size": list(size)})
    print(f"      {manifest['splits']['train']['count']} train / {manifest['splits']['val']['count']} val, "
          f"{manifest['num_classes']} classes: {', '.join(manifest['classes']['names'])}")

    cfg = SegConfig(arch="fcn8s", backbone="compact", width=16, epochs=epochs, batch_size=4, lr=4e-3,
                    warmup_epochs=0.5, image_every=2, threads_per_worker=1)
    run_name = f"demo-seg-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"[2/5] training FCN-8s on 2 Ray Train workers for {epochs} epochs (run '{run_name}')")
    summary = train_seg.run(str(shards), cfg, rt, workers=2, run_name=run_name, cpus_per_worker=1.0)
    reg = summary.get("registered") or {}
    print(f"      best val mIoU {100 * summary['best_val_miou']:.2f} at epoch {summary['best_epoch'] + 1}; "
          f"registered genseg-segmenter v{reg.get('version')}"
          + (" (now champion)" if reg.get("champion") else ""))

    print("[3/5] evaluating models:/genseg-segmenter@champion on the val split")
    tracking.setup(rt.workdir, rt.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tracking.resolve_ref("models:/genseg-segmenter@champion", dst=tmp)
        res = eval_seg.run(model_dir, str(shards), "val")
    res["model_ref"] = "models:/genseg-segmenter@champion"
    eval_json = demo_dir / "eval_val.json"
    eval_seg.write_json(res, str(eval_json))
    print(eval_seg.format_table(res))

    dsize = (size[0] // 2, size[1] // 2)
    dcfg = DiffusionConfig(cond="mask", image_size=dsize, channels=(32, 64, 64), epochs=diffusion_epochs,
                           batch_size=4, lr=2e-3, ema_decay=0.99, sample_steps=20, sample_every=4,
                           guidance=2.0, threads_per_worker=1)
    drun = f"demo-diffusion-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"[4/5] training a label-conditioned DDPM at {dsize[0]}x{dsize[1]} on 2 workers for "
          f"{diffusion_epochs} epochs (run '{drun}')")
    dsum = train_diffusion.run(str(shards), dcfg, rt, workers=2, run_name=drun)
    print(f"      best val loss {dsum['best_score']:.4f} at epoch {dsum['best_epoch'] + 1}")
    samples_dir = demo_dir / "samples"
    print(f"[5/5] sampling 8 images from val label maps (DDIM x20, w=2) -> {samples_dir}")
    sres = sample_job.run(Path(dsum["best_checkpoint"]), str(samples_dir), num=8, masks=str(shards),
                          sampler="ddim", steps=20, guidance=2.0, seed=0)
    backend = rt.tracking_uri
    print(f"""
done in {time.perf_counter() - t0:.0f}s. What was made:
  shards            {shards}
  best checkpoint   {summary['best_checkpoint']}
  evaluation        {eval_json}
  MLflow run        {summary['mlflow_run_id']} (experiment genseg-seg), model genseg-segmenter
  diffusion model   {dsum['best_checkpoint']} (experiment genseg-diffusion, model genseg-diffusion)
  samples           {sres['grid']} (label map | sample)
Open the tracking UI with:
  .venv/bin/mlflow ui --backend-store-uri {backend}
Evaluate again, or on other data:
  .venv/bin/genseg eval seg --model models:/genseg-segmenter@champion --data {shards} --workdir {rt.workdir}
Sample again, with another guidance weight:
  .venv/bin/genseg sample --num 8 --masks {shards} --guidance 4 --out {demo_dir / 'samples-w4'} --workdir {rt.workdir}""")
    return 0
