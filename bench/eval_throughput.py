"""`genseg eval seg` and DDIM sampling against bare loops doing the same work (issue 12, item 6).

    W=bench/runs
    .venv/bin/python bench/eval_throughput.py \\
        --segmenter $W/camvid/runs/camvid-fcn8s-shuffled-40/best --seg-data $W/camvid/shards \\
        --generator $W/camvid-diffusion/runs/camvid-ddpm/best --gen-data $W/camvid-diffusion/shards

Segmentation: `genseg eval seg` (the command, as a user runs it; its own in-process "seconds" and
the whole command's wall time) against a bare loop over the same checkpoint and split: read the
Parquet rows, decode, forward each image at its own size, resize the logits, argmax, confusion
matrix.  Both use the checkpoint's thread settings (torch default threads) and the same device.

Sampling: `DiffusionGenerator.generate` (what `genseg sample`, `eval gen`, `edit` and Serve call)
with DDIM against a bare diffusers `DDIMScheduler` loop on the same UNet, the same label-map
condition, guidance weight, steps, batch and initial noise.  Checks that both give the same pixels.

Medians of `--repeats` interleaved runs.  Writes bench/results/eval_throughput.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def bare_eval(model_path: str, data: str, split: str) -> tuple[float, int, float]:
    """-> (seconds, images, mIoU) of the bare loop."""
    import torch
    import torch.nn.functional as F

    from genseg.data.shards import decode_batch
    from genseg.data.transforms import MEAN, STD
    from genseg.loading import load
    from pipelines.shards import iter_split

    seg = load(model_path)
    model, k, ignore = seg.model.eval(), seg.config.num_classes, seg.config.ignore_index
    t = time.perf_counter()
    mat = torch.zeros(k, k, dtype=torch.int64)
    n = 0
    with torch.no_grad():
        for batch in iter_split(data, split, batch_size=16):
            for image, mask in decode_batch(batch):
                x = (torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255.0 - MEAN) / STD
                logits = model(x)
                if logits.shape[-2:] != mask.shape:
                    logits = F.interpolate(logits, size=mask.shape, mode="bilinear", align_corners=False)
                pred = logits.argmax(1)[0].reshape(-1)
                m = torch.from_numpy(mask.astype("int64")).reshape(-1)
                keep = m != ignore
                mat += torch.bincount(m[keep] * k + pred[keep], minlength=k * k).reshape(k, k)
                n += 1
    seconds = time.perf_counter() - t
    inter = mat.diag().double()
    union = mat.sum(0).double() + mat.sum(1).double() - inter
    present = union > 0
    return seconds, n, float((inter[present] / union[present]).mean())


def genseg_eval(model_path: str, data: str, split: str) -> tuple[float, float, int, float]:
    """-> (in-process seconds, command wall seconds, images, mIoU) of `genseg eval seg`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eval.json"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "jobs.cli", "eval", "seg", "--model", model_path, "--data", data,
                        "--split", split, "--json", str(out), "--workdir", tmp], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        res = json.loads(out.read_text())
    return res["seconds"], wall, res["images"], res["miou"]


def sampling(gen_path: str, data: str, n: int, steps: int, guidance: float, batch: int, repeats: int) -> dict:
    import torch
    from diffusers import DDIMScheduler

    from genseg.data.shards import decode_batch
    from genseg.diffusion.conditioning import encode_labels, null_condition
    from genseg.diffusion.guidance import guide
    from genseg.diffusion.sampling import to_uint8
    from genseg.generation import labels_at
    from genseg.loading import load
    from pipelines.shards import iter_split

    gen = load(gen_path)
    masks = torch.stack([torch.from_numpy(m.astype("int64"))
                         for b in iter_split(data, "val", limit=n) for _, m in decode_batch(b)])
    settings = {"sampler": "ddim", "steps": steps, "guidance": guidance}

    def ours():
        return gen.generate(masks, n, seed=0, batch_size=batch, **settings)

    def bare():
        """diffusers' DDIM loop written out: the UNet, the scheduler, classifier-free guidance."""
        sched = DDIMScheduler.from_config(gen.noise.config, timestep_spacing="trailing", set_alpha_to_one=False)
        sched.set_timesteps(steps)
        cond = encode_labels(labels_at(masks, gen.image_size), gen.num_classes, gen.ignore_index)
        g = torch.Generator().manual_seed(0)
        out = []
        with torch.no_grad():
            for s in range(0, n, batch):
                c = cond[s: s + batch]
                x = torch.randn((len(c), 3, *gen.image_size), generator=g) * sched.init_noise_sigma
                both = torch.cat([null_condition(c), c])
                for t in sched.timesteps:
                    eps_u, eps_c = gen.model(torch.cat([x, x]), t, both).chunk(2)
                    x = sched.step(guide(eps_u, eps_c, guidance), t, x, generator=g).prev_sample
                out.append(to_uint8(x.clamp(-1, 1)))
        return torch.cat(out)

    times = {"genseg": [], "bare": []}
    results = {}
    ours()                                       # warm-up: first-call allocations are not per-image cost
    for _ in range(repeats):
        for name, fn in (("genseg", ours), ("bare", bare)):
            t = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t)
    same = bool(torch.equal(results["genseg"], results["bare"]))
    med = {k: statistics.median(v) / n for k, v in times.items()}
    print(f"DDIM x{steps}, guidance {guidance}, {n} images at {tuple(gen.image_size)}, batch {batch}: "
          f"genseg {med['genseg']:.3f} s/image, bare diffusers loop {med['bare']:.3f} s/image, "
          f"ratio {med['genseg'] / med['bare']:.3f}; same pixels: {same}")
    return {"images": n, "steps": steps, "guidance": guidance, "batch": batch, "size": list(gen.image_size),
            "s_per_image": med, "ratio": med["genseg"] / med["bare"], "same_pixels": same, "runs_s": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segmenter", required=True)
    ap.add_argument("--seg-data", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--generator", required=True)
    ap.add_argument("--gen-data", required=True)
    ap.add_argument("--num", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    runs = {"genseg": [], "genseg_wall": [], "bare": []}
    for _ in range(args.repeats):
        s, wall, n, miou = genseg_eval(args.segmenter, args.seg_data, args.split)
        runs["genseg"].append(s)
        runs["genseg_wall"].append(wall)
        b, nb, miou_b = bare_eval(args.segmenter, args.seg_data, args.split)
        runs["bare"].append(b)
        print(f"  eval seg {n} images: genseg {s:.2f} s (command {wall:.2f} s), bare loop {b:.2f} s; "
              f"mIoU {100 * miou:.2f} vs {100 * miou_b:.2f}", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    seg = {"images": n, "median_s": med, "img_per_s": {"genseg": n / med["genseg"], "bare": n / med["bare"]},
           "ratio": med["bare"] / med["genseg"], "miou": {"genseg": miou, "bare": miou_b}, "runs_s": runs}
    print(f"eval seg: genseg {seg['img_per_s']['genseg']:.1f} img/s, bare {seg['img_per_s']['bare']:.1f} img/s "
          f"({seg['ratio']:.3f} of the bare rate); the command with start-up: {med['genseg_wall']:.1f} s")
    gen = sampling(args.generator, args.gen_data, args.num, args.steps, args.guidance, args.batch, args.repeats)
    doc = {"machine": {"cores": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat()},
           "args": vars(args), "eval_seg": seg, "ddim": gen}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eval_throughput.json").write_text(json.dumps(doc, indent=2))
    print(f"wrote {RESULTS / 'eval_throughput.json'}")


if __name__ == "__main__":
    main()
