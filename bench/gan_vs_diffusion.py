"""GAN (each loss) against diffusion (each sampler) on the same data, conditioning and metrics.

    .venv/bin/python bench/gan_vs_diffusion.py --data SHARDS --segmenter REF \
        --gan hinge=REF,nsgan=REF,... --diffusion-table bench/results/diffusion_samplers{tag}.json \
        [--num 128] [--workdir DIR] [--tag _name]

Every GAN is scored by `genseg eval gen`'s protocol at the very n, seed, label maps, real set and
segmenter of the diffusion sampler table it is compared with (the script refuses a table measured
under another protocol), so the diffusion rows are taken from that table instead of sampling
DDPM x1000 again.  Each row: FD (bootstrap std), KID, segmenter mIoU of the conditioned samples vs
the real ceiling, diversity (precision / recall / coverage in the segmenter's features), class
histogram TV distance, seconds per image, training wall time (from the MLflow run), and the FD
ratio against DDPM x1000 with a paired bootstrap interval.  Pictures: loss curves of every run,
and samples on the same label maps side by side.

Results: bench/results/gan_vs_diffusion{tag}.json, gan_loss_curves{tag}.png, gan_vs_diffusion_samples{tag}.png
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


def run_figures(client, run_id: str, names: tuple[str, ...]) -> dict:
    """Metric histories of a run and its training wall time (the sum of its epochs' seconds)."""
    out = {n: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, n), key=lambda m: m.step)]
           for n in names}
    secs = client.get_metric_history(run_id, "epoch_seconds")
    out["train_seconds"] = float(sum(m.value for m in secs))
    out["epochs"] = len(secs)
    return out


def run_id_of(client, ref, experiment: str, job: str) -> str | None:
    """The MLflow run of a resolved REF: its own run id, else (a checkpoint directory
    ``.../runs/<run name>/best``) the training run (``job``, e.g. "train gan") of that name in
    ``experiment``, not a search that shares its name."""
    from genseg import tracking

    if ref.run_id:
        return ref.run_id
    exp = client.get_experiment_by_name(experiment)
    run = tracking.find_run(exp.experiment_id, Path(ref.path).resolve().parent.name, job) if exp else None
    return run.info.run_id if run else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--segmenter", required=True)
    ap.add_argument("--gan", required=True, help="name=REF[,name=REF...]: the GANs, e.g. hinge=runs/g-hinge/best")
    ap.add_argument("--diffusion-table", required=True, help="JSON of bench/diffusion_samplers.py on the same data")
    ap.add_argument("--diffusion", help="the diffusion model REF of that table (for its picture and training time)")
    ap.add_argument("--num", type=int, default=None, help="default: the table's n")
    ap.add_argument("--workdir", default="genseg-runs")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    import numpy as np
    import torch
    from mlflow.tracking import MlflowClient

    from genseg import tracking
    from genseg.data.classes import colorize
    from genseg.loading import load
    from genseg.metrics.generation import fd_ratio_interval
    from genseg.viz import save_png, stack_rows, upscale
    from jobs import eval_gen
    from jobs.runtime import resolve
    from jobs.sample_job import label_maps

    table = json.loads(Path(args.diffusion_table).read_text())
    n = args.num or table["rows"][0]["n"]
    proto = table["rows"][0]["protocol"]
    if n != table["rows"][0]["n"] or Path(proto["data"]) != Path(args.data).resolve():
        sys.exit(f"{args.diffusion_table} was measured with n={table['rows'][0]['n']} on {proto['data']}; "
                 f"compare at the same n on the same data")
    rt = resolve(args.workdir, None, None)
    tracking.setup(rt.workdir, rt.tracking_uri)
    client = MlflowClient()
    tmp = tempfile.mkdtemp()
    seg_ref = tracking.resolve(args.segmenter, rt.tracking_uri, dst=f"{tmp}/s")
    if seg_ref.describe() != proto["segmenter"] and str(seg_ref.path) not in proto["segmenter"]:
        print(f"note: the table's segmenter was {proto['segmenter']}; this run uses {seg_ref.describe()}")
    seg = load(seg_ref, expect="segmenter")
    torch.set_num_threads(os.cpu_count() or 1)
    feats_path = Path(rt.workdir) / f"diffusion_samplers{args.tag}_features.pt"
    feats = torch.load(feats_path, weights_only=True) if feats_path.exists() else {}
    ddpm_spec = next((r["spec"] for r in table["rows"] if r["sampler"] == "ddpm" and r.get("spec")), None)

    rows = []
    diffusion_run = None
    if args.diffusion:
        dref = tracking.resolve(args.diffusion, rt.tracking_uri, dst=f"{tmp}/d")
        diffusion_run = run_id_of(client, dref, "genseg-diffusion", "train diffusion")
    dfig = run_figures(client, diffusion_run, ("train_loss", "val_x0_mse")) if diffusion_run else None
    for r in table["rows"]:
        rows.append({"model": f"diffusion {r['sampler']} x{r['steps']}", "family": "diffusion", "fd": r["fd"],
                     "fd_std": r["fd_std"], "kid": r["kid"], "seg_miou": r["seg_miou_samples"],
                     "ceiling": r["seg_miou_real_ceiling"], "diversity": r.get("diversity"),
                     "class_tv": r.get("class_tv"), "s_per_image": r["s_per_image"],
                     "train_seconds": dfig["train_seconds"] if dfig else None, "n": r["n"],
                     "fd_ratio_ci": r.get("fd_ratio_ci") if r["sampler"] != "ddpm" else None, "spec": r.get("spec")})
    curves = {"diffusion": dfig} if dfig else {}
    gans = dict(item.split("=", 1) for item in args.gan.split(","))
    gan_objs = {}
    for name, ref in gans.items():
        gref = tracking.resolve(ref, rt.tracking_uri, dst=f"{tmp}/g-{name}")
        gan = load(gref, expect="generator")
        gan_objs[name] = gan
        res = eval_gen.run(gan, seg, args.data, split=proto["split"], num=n, seed=proto["seed"], inpaint_num=0,
                           model_ref=gref.describe(), segmenter_ref=seg_ref.describe(), keep_features=True)
        f = res.pop("features")
        ci = None
        if ddpm_spec and "real" in feats and torch.equal(feats["real"], f["real"]):
            ci = fd_ratio_interval(f["real"], f["fake"], feats[ddpm_spec])
        run_id = run_id_of(client, gref, "genseg-gan", "train gan")
        fig = run_figures(client, run_id, ("d_loss", "g_loss", "d_real", "d_fake", "val_fd_rand", "rand_coverage")) \
            if run_id else None
        curves[f"gan {name}"] = fig
        rows.append({"model": f"GAN {name}", "family": "gan", "fd": res["fd"], "fd_std": res["fd_std"],
                     "kid": res["kid"], "seg_miou": res.get("seg_miou_samples"),
                     "ceiling": res.get("seg_miou_real_ceiling"), "diversity": res.get("diversity"),
                     "class_tv": res["class_histogram"]["tv_distance"], "s_per_image": res["seconds_per_image"],
                     "train_seconds": fig["train_seconds"] if fig else None, "n": res["n"], "fd_ratio_ci": ci,
                     "epochs": fig["epochs"] if fig else None, "ref": gref.describe()})
        print(f"GAN {name}: FD {res['fd']:.3f} +- {res['fd_std']:.3f}, seg mIoU {res.get('seg_miou_samples')}, "
              f"coverage {res['diversity']['coverage'] if res.get('diversity') else None}, "
              f"{res['seconds_per_image'] * 1000:.2f} ms/image", flush=True)

    res_dir = ROOT / "bench" / "results"
    out = {"benchmark": "gan_vs_diffusion", "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
           "machine": {"cores": os.cpu_count(), "device": "cpu", "platform": platform.platform()},
           "n": n, "noise_floor": table.get("noise_floor"), "protocol": proto, "rows": rows,
           "diffusion_table": args.diffusion_table}
    (res_dir / f"gan_vs_diffusion{args.tag}.json").write_text(json.dumps(out, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gan_curves = {k: v for k, v in curves.items() if k.startswith("gan") and v}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=110)
    for i, (name, c) in enumerate(gan_curves.items()):
        col = f"C{i}"                      # one colour per GAN: D solid, G dashed
        axes[0].plot([s + 1 for s, _ in c["d_loss"]], [v for _, v in c["d_loss"]], color=col, label=f"{name} D")
        axes[0].plot([s + 1 for s, _ in c["g_loss"]], [v for _, v in c["g_loss"]], "--", color=col, label=f"{name} G")
        axes[1].plot([s + 1 for s, _ in c["val_fd_rand"]], [v for _, v in c["val_fd_rand"]], color=col, label=name)
        axes[2].plot([s + 1 for s, _ in c["rand_coverage"]], [v for _, v in c["rand_coverage"]], color=col, label=name)
    axes[0].set_title("GAN losses (D solid, G dashed)")
    axes[1].set_title("val FD in random features (lower better)")
    axes[2].set_title("val coverage in random features")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    if dfig:
        ax2 = axes[1].twinx()
        ax2.plot([s + 1 for s, _ in dfig["val_x0_mse"]], [v for _, v in dfig["val_x0_mse"]], "k:",
                 label="diffusion val x0-MSE")
        ax2.legend(fontsize=7, loc="upper center")
    fig.tight_layout()
    fig.savefig(res_dir / f"gan_loss_curves{args.tag}.png")

    # samples on the same 4 label maps: label | each GAN | the diffusion model (DDIM x20), upscaled
    some = next(iter(gan_objs.values()))
    labels = label_maps(args.data, proto["split"], 4, some)
    palette = some.classes["palette"]
    cols = [np.concatenate([colorize(m.numpy(), palette) for m in labels], axis=0)]
    for gan in gan_objs.values():
        cols.append(np.concatenate(list(gan.generate(labels, 4, seed=0).numpy()), axis=0))
    if args.diffusion:
        diff = load(tracking.resolve(args.diffusion, rt.tracking_uri, dst=f"{tmp}/d2"), expect="generator")
        cols.append(np.concatenate(list(diff.generate(labels, 4, seed=0, sampler="ddim", steps=20).numpy()), axis=0))
    save_png(upscale(stack_rows([np.concatenate(cols, axis=1)]), 768), res_dir / f"gan_vs_diffusion_samples{args.tag}.png")
    print(f"wrote {res_dir / f'gan_vs_diffusion{args.tag}.json'}")


if __name__ == "__main__":
    main()
