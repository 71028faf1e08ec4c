"""Sampler x steps table for a diffusion model: seconds per image and generation metrics.

    .venv/bin/python bench/diffusion_samplers.py --model REF --segmenter REF --data SHARDS \
        [--num 32] [--grid ddpm:1000,ddim:20,ddim:50,dpmpp:20,dpmpp:50] [--workdir DIR] [--tag _name]

For each sampler:steps it runs `genseg eval gen` logic (same seed, same label maps, same real set)
and records s/image, FD, KID and the segmenter mIoU of the samples.  Because every row is sampled
on the same label maps with the same seed, each fast row's FD ratio against DDPM gets a *paired*
bootstrap interval (``fd_ratio_ci``: the row indices are resampled once per round for the real set
and both samplers), which is what resolves a 10 % question at sample counts a CPU can afford.
The features of every row are kept in ``WORKDIR/diffusion_samplers{tag}_features.pt`` so that
``--update`` can re-measure some rows and still pair them with the others.  It also measures the FD noise
floor at this sample count (FD between two disjoint real sets of ``--num`` images) and writes a
picture of samples for w in {0, 1, 3, 5}.  The JSON is rewritten after every row, so a long DDPM
row that is interrupted leaves the finished rows on disk.

The issue's goal: DDIM / DPM-Solver++ at 20-50 steps at least 20x faster than DDPM at T=1000 with
FD within 10% (fd_fast <= 1.10 * fd_ddpm); each row gets ``meets_goal`` when a ddpm row exists.
Results: bench/results/diffusion_samplers{tag}.json and diffusion_guidance{tag}.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models:/genseg-diffusion@champion")
    ap.add_argument("--segmenter", default="models:/genseg-segmenter@champion")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--num", type=int, default=32)
    ap.add_argument("--grid", default="ddpm:1000,ddim:20,ddim:50,dpmpp:20,dpmpp:50")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--inpaint-num", type=int, default=8,
                    help="held-out images with a 25%% hole for inpainting PSNR/SSIM (rows of <= 100 steps)")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--workdir", default="genseg-runs")
    ap.add_argument("--tag", default="", help="suffix for the result files")
    ap.add_argument("--update", action="store_true",
                    help="keep the rows of an existing result file that --grid does not re-measure")
    ap.add_argument("--no-picture", action="store_true", help="skip the guidance picture")
    args = ap.parse_args()

    import numpy as np
    import torch

    from genseg import tracking
    from genseg.data.classes import colorize
    from genseg.loading import load
    from genseg.viz import save_png, stack_rows
    from jobs import eval_gen
    from jobs.runtime import resolve
    from jobs.sample_job import label_maps

    rt = resolve(args.workdir, None, None)
    tracking.setup(rt.workdir, rt.tracking_uri)
    tmp = tempfile.mkdtemp()
    gen_ref = tracking.resolve(args.model, rt.tracking_uri, dst=f"{tmp}/d")
    seg_ref = tracking.resolve(args.segmenter, rt.tracking_uri, dst=f"{tmp}/s")
    gen, seg = load(gen_ref, expect="generator"), load(seg_ref, expect="segmenter")
    torch.set_num_threads(os.cpu_count() or 1)
    out = {"benchmark": "diffusion_samplers", "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
           "machine": {"cores": os.cpu_count(), "device": "cpu", "platform": platform.platform()},
           "versions": {"torch": torch.__version__},
           "goal": "fast samplers at 20-50 steps: speedup_vs_ddpm >= 20 and fd <= 1.10 * fd(ddpm x1000)",
           "models": {"generator": gen_ref.describe(), "segmenter": seg_ref.describe()}, "rows": []}
    path = ROOT / "bench" / "results" / f"diffusion_samplers{args.tag}.json"
    feats_path = Path(rt.workdir) / f"diffusion_samplers{args.tag}_features.pt"
    feats: dict[str, torch.Tensor] = {}
    rows = out["rows"]
    if args.update and feats_path.exists():
        feats = torch.load(feats_path, weights_only=True)
    if args.update and path.exists():
        old = json.loads(path.read_text())
        specs = {tuple(spec.split(":")) for spec in args.grid.split(",")}
        rows.extend(r for r in old["rows"] if (r["sampler"], str(r["steps"])) not in specs)
        out["guidance_picture"] = old.get("guidance_picture")
        out["command"] = old["command"] + " ; then " + out["command"]
    for spec in args.grid.split(","):
        sampler, steps = spec.split(":")
        res = eval_gen.run(gen, seg, args.data, split=args.split, num=args.num, sampler=sampler,
                           steps=int(steps), guidance=args.guidance, batch_size=args.batch_size,
                           inpaint_num=args.inpaint_num if int(steps) <= 100 else 0,
                           model_ref=gen_ref.describe(), segmenter_ref=seg_ref.describe(), keep_features=True)
        f = res.pop("features")
        if "real" in feats and not torch.equal(feats["real"], f["real"]):
            feats = {}                # another real set (other --num or data): earlier rows cannot be paired
        feats["real"], feats[spec] = f["real"], f["fake"]
        torch.save(feats, feats_path)
        out["noise_floor"] = res["noise_floor"]
        row = {"sampler": sampler, "steps": int(steps), "spec": spec, "s_per_image": res["seconds_per_image"], "fd": res["fd"],
               "fd_std": res["fd_std"], "kid": res["kid"], "kid_std": res["kid_std"], "seg_miou_samples": res.get("seg_miou_samples"),
               "seg_miou_real_ceiling": res.get("seg_miou_real_ceiling"), "n": res["n"], "inpaint_psnr": res.get("inpaint_psnr"),
               "inpaint_ssim": res.get("inpaint_ssim"), "diversity": res.get("diversity"),
               "class_tv": res["class_histogram"]["tv_distance"], "protocol": res["protocol"]}
        rows.append(row)
        compare(rows, feats)
        path.write_text(json.dumps(out, indent=2))
        print(f"{sampler:>6} x{steps:>5}: {row['s_per_image']:.3f} s/img  FD {row['fd']:.3f}  KID {row['kid']:.4f}  "
              f"seg mIoU {row['seg_miou_samples']}", flush=True)
    for r in rows:
        if r.get("fd_ratio_ci"):
            ci = r["fd_ratio_ci"]
            print(f"{r['spec']:>12}: {r['speedup_vs_ddpm']:.1f}x faster, FD/FD(DDPM) {ci['ratio']:.3f} "
                  f"[{ci['low']:.3f}, {ci['high']:.3f}] (paired 95 %, n={ci['n']}): {r['goal']}")

    # samples for w in {0, 1, 3, 5} on the same label maps and noise
    picture = None
    if gen.conditional and not args.no_picture:
        labels = label_maps(args.data, args.split, 4, gen)
        palette = gen.classes["palette"]
        cols = [np.concatenate([colorize(m.numpy(), palette) for m in labels], axis=0)]
        for w in (0.0, 1.0, 3.0, 5.0):
            x = gen.generate(labels, 4, seed=0, sampler="ddim", steps=50, guidance=w)
            cols.append(np.concatenate(list(x.numpy()), axis=0))
        picture = save_png(stack_rows([np.concatenate(cols, axis=1)]),
                           ROOT / "bench" / "results" / f"diffusion_guidance{args.tag}.png")
    if picture:
        out["guidance_picture"] = str(picture.relative_to(ROOT))
    out["picture_layout"] = "columns: label map | w=0 | w=1 | w=3 | w=5 (DDIM x50, same noise)"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


def compare(rows: list[dict], feats: dict | None = None) -> None:
    """Speed-up and FD ratio of every row against the DDPM row, once there is one; rows in table
    order.  With the rows' features, the ratio gets a paired 95 % bootstrap interval and the goal
    a verdict: "met" (interval below 1.10 and >= 20x faster), "not met" (interval above 1.10 or
    too slow) or "unresolved" (the interval straddles 1.10)."""
    from genseg.metrics.generation import fd_ratio_interval
    rows.sort(key=lambda r: (["ddpm", "ddim", "dpmpp"].index(r["sampler"]), r["steps"]))
    base = next((r for r in rows if r["sampler"] == "ddpm"), None)
    for r in rows:
        if base and r is not base:
            r["speedup_vs_ddpm"] = base["s_per_image"] / r["s_per_image"]
            r["fd_ratio_vs_ddpm"] = r["fd"] / base["fd"] if base["fd"] else None
            ci = None
            if feats and "real" in feats and r.get("spec") in feats and base.get("spec") in feats:
                ci = fd_ratio_interval(feats["real"], feats[r["spec"]], feats[base["spec"]])
            r["fd_ratio_ci"] = ci
            fast = r["speedup_vs_ddpm"] >= 20
            if ci is None:
                r["goal"] = "unresolved"
            elif not fast or ci["low"] > 1.10:
                r["goal"] = "not met"
            elif ci["high"] <= 1.10:
                r["goal"] = "met"
            else:
                r["goal"] = "unresolved"
            r["meets_goal"] = r["goal"] == "met"


if __name__ == "__main__":
    main()
