"""The ``genseg`` command line: the user's front door (README.md describes every command).

Each subcommand parses flags, resolves the runtime (workdir, MLflow URI, Ray address) and
calls one function in ``jobs/`` or ``pipelines/``.  Known input problems end as one line on
stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h < 8 or w < 8:
            raise ValueError
        return h, w
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW with both >= 8, e.g. 360x480; got {text!r}") from None


def _scale_value(text: str) -> float:
    """A finite number in (0, 4], or ValueError."""
    v = float(text)
    if not (math.isfinite(v) and 0 < v <= 4):
        raise ValueError(text)
    return v


def _scales(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated scales, each a finite number in (0, 4]."""
    try:
        return tuple(_scale_value(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"scales must be comma-separated numbers in (0, 4], e.g. 0.75,1,1.25; "
                                         f"got {text!r}") from None


def _scale(text: str) -> float:
    """An argparse type: one scale, a finite number in (0, 4]."""
    try:
        return _scale_value(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"scale must be a number in (0, 4], e.g. 0.5; got {text!r}") from None


# `tune` flags of the sampling search alone (TuneOptions fields, min_fraction the Objective's)
SAMPLING_FLAGS = ("split", "batch_size", "num", "min_fraction", "model", "segmenter", "cpus_per_trial")


def _whole(minimum: int):
    """An argparse type: a whole number >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {v}")
        return v
    return parse


_count, _count0 = _whole(1), _whole(0)


def _workers(text: str):
    """``N`` workers, or ``MIN-MAX`` for an elastic run -> int or (min, max)."""
    lo, sep, hi = text.partition("-")
    try:
        a = _count(lo)
        if not sep:
            return a
        b = _count(hi)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"--workers: expected N or MIN-MAX (e.g. 2 or 1-4), got {text!r}") from None
    if a > b:
        raise argparse.ArgumentTypeError(f"--workers {text}: MIN is larger than MAX")
    return a if a == b else (a, b)


def _steps(text: str) -> int:
    v = _count(text)
    if v > 10_000:   # the model's own T is checked when it is loaded
        raise argparse.ArgumentTypeError(f"{v} sampling steps is more than any model's training timesteps")
    return v


def _champion_flags(p, what: str) -> None:
    """--promote and --champion-margin: how a new model version may take the champion alias."""
    p.add_argument("--promote", action="store_true",
                   help=f"make {what} the champion even if the champion was scored on other data")
    p.add_argument("--champion-margin", type=_finite_nonneg("--champion-margin"), default=0.0, metavar="M",
                   help="take the champion alias only by beating its score by more than M, in the score's units "
                        "(mIoU is a fraction: 1.5 points is 0.015); e.g. the recipe's seed-to-seed sd. "
                        "Default 0: any gain")


def _finite_nonneg(name: str):
    """An argparse type: a finite float >= 0, the error naming ``name``."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(v) or v < 0:
            raise argparse.ArgumentTypeError(f"{name} must be a finite number >= 0, got {text!r}")
        return v
    return parse


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    """The sampling flags, declared once for every command that samples.  They default to None:
    the model's own settings (registry version, else its checkpoint) apply unless a flag is given."""
    from genseg.generation import SAMPLER_NAMES

    g = p.add_argument_group("sampling (default: the model's own settings)")
    g.add_argument("--sampler", choices=SAMPLER_NAMES, help="ddpm (T steps), ddim or dpmpp")
    g.add_argument("--steps", type=_steps, help="number of sampling steps")
    g.add_argument("--guidance", type=_finite_nonneg("guidance"), help="classifier-free guidance weight w "
                   "(0 = unconditional, 1 = plain conditional, > 1 stronger)")
    g.add_argument("--truncation", type=_finite_nonneg("truncation"), help="GAN only: redraw latent components beyond "
                   "+-T (the truncation trick; 0 = off)")
    g.add_argument("--seed", type=int, default=0)


def _sampling(args) -> dict:
    return {"sampler": args.sampler, "steps": args.steps, "guidance": args.guidance, "truncation": args.truncation}


def _runtime_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--workdir", help="where runs, checkpoints and the MLflow store live "
                                     "(default ./genseg-runs or $GENSEG_WORKDIR)")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<workdir>/mlflow.db)")
    g.add_argument("--ray-address", help="join this Ray cluster (HOST:PORT, ray://HOST:10001, or auto for the "
                                         "one running on this machine) instead of starting a local one")
    # also accepted before the command (`genseg --verbose train ...`); SUPPRESS keeps that value
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show Ray's own logs too (or GENSEG_VERBOSE=1)")


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line too, pointing at --help (subcommand parsers inherit this)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _readme() -> str:
    here = Path(__file__).resolve().parents[1] / "README.md"
    return str(here) if here.is_file() else "README.md in the genseg source repository"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="genseg", description="genseg: image/mask data -> Parquet shards -> FCN segmentation "
                     "and DDPM diffusion models, trained on Ray with MLflow tracking.",
                     epilog=f"Start with `make demo`. Every command and flag is described in {_readme()}.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Ray's own logs too (or GENSEG_VERBOSE=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="turn images + masks into Parquet shards (Ray Data)")
    p.add_argument("--source", choices=("synthetic", "camvid", "folder"), required=True)
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--num", type=int, default=200, help="synthetic: number of scenes")
    p.add_argument("--seed", type=int, default=0, help="synthetic scenes / folder split seed")
    p.add_argument("--size", type=_size, help="HxW: synthetic scene size, or resize real data to it")
    p.add_argument("--root", help="camvid: dataset root")
    p.add_argument("--splits", default="train,val", help="camvid: comma-separated splits")
    p.add_argument("--images", help="folder: image directory")
    p.add_argument("--masks", help="folder: mask directory")
    p.add_argument("--num-classes", type=int, help="folder: number of classes (default: inferred)")
    p.add_argument("--palette", help="folder: JSON palette file for RGB colour masks")
    p.add_argument("--binary-masks", action="store_true",
                   help="folder: masks are binary 0/255 (or 0/1) foreground masks: 255 -> class 1 'foreground'")
    p.add_argument("--val-fraction", type=float, default=0.2, help="synthetic/folder: share held out as val")
    p.add_argument("--holdout", metavar="SEQ[,SEQ]",
                   help="camvid/folder: move the training pairs whose file names start with these prefixes (CamVid "
                        "sequences, e.g. 0006R0) into a split 'holdout': streets never seen in training")
    p.add_argument("--skip-bad", action="store_true", help="skip and list bad pairs instead of failing")
    p.add_argument("--codec", choices=("png", "webp", "raw"), default="png",
                   help="how shards hold pixels (all lossless): png (default), webp (smaller) or raw arrays "
                        "(largest, nothing to decode when training); see bench/README.md, 'Shard encoding'")
    p.add_argument("--chunk", type=_whole(1), help="pairs per Ray Data task and per shard file (default 32)")
    _runtime_flags(p)

    p = sub.add_parser("encode", help="encode shards to latent shards with a trained autoencoder (latent diffusion)")
    p.add_argument("--data", required=True, help="pixel shard directory from `genseg prepare`")
    p.add_argument("--out", required=True, help="the latent shard directory to write")
    p.add_argument("--vae", default="models:/genseg-vae@champion", help="autoencoder REF (genseg train vae)")
    p.add_argument("--size", type=_size, help="encode images at HxW (default: the shards' size; a multiple of the "
                                              "autoencoder's factor)")
    p.add_argument("--actors", type=_whole(1), default=2, help="encoding actors (Ray Data batch inference)")
    _runtime_flags(p)

    p = sub.add_parser("train", help="train a model on Ray Train")
    p.add_argument("task", choices=("seg", "diffusion", "gan", "vae"),
                   help="seg: FCN segmenter; diffusion: DDPM; gan: DCGAN family; vae: the autoencoder of latent "
                        "diffusion")
    p.add_argument("--data", required=True, help="shard directory from `genseg prepare`")
    p.add_argument("--workers", type=_workers, default=2,
                   help="Ray Train workers: N, or MIN-MAX for an elastic run that shrinks when workers or nodes "
                        "are lost and grows back when they return (default 2)")
    p.add_argument("--spread", action="store_true", help="place the workers on as many nodes as possible "
                                                         "(default: pack them)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL, autocast")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--arch", choices=("fcn32s", "fcn16s", "fcn8s"))
    p.add_argument("--backbone", choices=("compact", "resnet18", "resnet34", "resnet50"))
    p.add_argument("--cond", choices=("none", "mask"), help="diffusion/gan: unconditional or label-map conditioned")
    from genseg.config import GAN_LOSSES

    p.add_argument("--loss", choices=GAN_LOSSES, help="gan: the objective (default hinge)")
    p.add_argument("--latent", metavar="REF", help="diffusion: train in the latent space of this autoencoder "
                                                   "(e.g. models:/genseg-vae@champion); the shards are encoded "
                                                   "once and cached in the workdir")
    p.add_argument("--config", help="YAML file of config fields")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any config field, e.g. --set crop=256x256 (repeatable)")
    p.add_argument("--class-weights", help="seg: none | median-freq | inv-sqrt | dataset, each optionally capped "
                                           "as NAME:CAP (e.g. median-freq:5), or a comma-separated list")
    p.add_argument("--select-on", metavar="SPLIT",
                   help="seg: the split whose mIoU picks the best checkpoint and the champion (default val; e.g. "
                        "holdout, from `genseg prepare --holdout SEQ`); every split but train is scored each epoch")
    p.add_argument("--run-name", help="name of the run; re-use it to resume")
    p.add_argument("--max-failures", type=int, default=0, help="worker-group restarts before giving up")
    _champion_flags(p, "this run's model")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--json", help="write the run summary here")
    _runtime_flags(p)

    p = sub.add_parser("eval", help="evaluate a model")
    p.add_argument("task", choices=("seg", "gen"))
    p.add_argument("--model", help="checkpoint dir, MLflow run id or models:/ URI (default: the champion "
                                   "genseg-segmenter for seg, genseg-diffusion for gen; a GAN: "
                                   "models:/genseg-gan@champion)")
    p.add_argument("--segmenter", default="models:/genseg-segmenter@champion",
                   help="gen: the segmenter whose features and mIoU score the samples")
    p.add_argument("--num", type=_count, default=64, help="gen: number of real/generated images")
    _sampling_flags(p)
    p.add_argument("--inpaint-num", type=_count0, default=8, help="gen: images for the inpainting PSNR/SSIM")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--infer-scale", type=_scale, help="run the model at this scale (default from its config)")
    p.add_argument("--tta-flip", action="store_true",
                   help="seg: test-time augmentation, the mirrored image too (logits averaged before argmax)")
    p.add_argument("--tta-scales", type=_scales, metavar="S[,S]",
                   help="seg: test-time augmentation over these scales of the input, e.g. 0.75,1,1.25")
    p.add_argument("--pictures", metavar="PNG",
                   help="seg: write image | truth | prediction | error map for the first --pictures-num images")
    p.add_argument("--pictures-num", type=_count, help="with --pictures: how many images (default 4)")
    p.add_argument("--limit", type=_count, help="evaluate only the first N images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the figures here")
    _runtime_flags(p)

    p = sub.add_parser("sample", help="draw images from a generative model (diffusion or GAN)")
    p.add_argument("--model", default="models:/genseg-diffusion@champion",
                   help="checkpoint dir, MLflow run id or models:/ URI (default: the champion)")
    p.add_argument("--num", type=_count, default=8)
    p.add_argument("--out", required=True, help="directory for the PNGs and grid.png")
    p.add_argument("--masks", help="shard directory whose label maps condition the samples")
    p.add_argument("--split", default="val", help="split of --masks to take label maps from")
    _sampling_flags(p)
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    p.add_argument("--batch-size", type=_count, default=8)
    p.add_argument("--device", default="cpu")
    _runtime_flags(p)

    p = sub.add_parser("edit", help="remove objects or replace the background of an image")
    p.add_argument("--model", default="models:/genseg-diffusion@champion",
                   help="generative model REF (diffusion or GAN)")
    p.add_argument("--segmenter", default="models:/genseg-segmenter@champion", help="segmenter REF")
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True, help="output PNG (a .mask.png and a .json are written beside it)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--remove", metavar="CLASS[,CLASS]", help="classes to remove (names or ids)")
    what.add_argument("--background", metavar="LABELMAP", help="label-map PNG for the new background, or 'none'")
    what.add_argument("--extend", metavar="SIDE=PX[,SIDE=PX]",
                      help="outpaint: grow the canvas, e.g. left=64,right=64 (sides: top, bottom, left, right)")
    p.add_argument("--keep", metavar="CLASS[,CLASS]", help="with --background: foreground classes to keep")
    p.add_argument("--label-map", metavar="PNG", help="with --extend: class ids for the whole extended canvas "
                                                      "(default: the segmenter's labels, grown outwards)")
    p.add_argument("--crop", action="store_true", help="only the region: fill a box around it (plus --margin) at "
                                                       "the model's size and paste it back (always on for --extend)")
    p.add_argument("--margin", type=_count0, default=16, help="context pixels around the region with --crop")
    _sampling_flags(p)
    p.add_argument("--resample", type=_count, default=1, help="RePaint resampling jumps per step (ddpm/ddim)")
    p.add_argument("--dilate", type=_count0, default=3)
    p.add_argument("--feather", type=_count0, default=2)
    p.add_argument("--device", default="cpu")
    _runtime_flags(p)

    p = sub.add_parser("tune", help="search training recipes or sampling settings on Ray Tune; register the winner")
    p.add_argument("task", choices=("diffusion", "seg"))
    p.add_argument("--data", required=True, help="shard directory from `genseg prepare`")
    p.add_argument("--stage", choices=("all", "schedule", "sampling"), default="all",
                   help="diffusion: the schedule search (training), the sampling search (no training), or both")
    p.add_argument("--space", help="YAML file of search spaces by stage (schedule, sampling, seg); "
                                   "a stage it names replaces that stage's default space")
    p.add_argument("--search", choices=("grid", "random", "tpe"), default="grid",
                   help="grid: every combination of the listed values; random: --samples random draws; "
                        "tpe: --samples trials proposed by Optuna's TPE")
    p.add_argument("--samples", type=_count, default=1, help="grid: repeats of the grid; random/tpe: trials")
    p.add_argument("--max-concurrent", type=_count,
                   help="trials at once (default 1 for training searches, 2 for the sampling search)")
    p.add_argument("--name", help="name of the search; re-use it to resume (finished trials are kept)")
    p.add_argument("--epochs", type=_count, help="training searches: epochs per trial (ASHA's maximum)")
    p.add_argument("--config", help="training searches: YAML file of the base config")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="training searches: override a base config field (repeatable)")
    p.add_argument("--class-weights", help="seg: the base class weighting (none | median-freq | inv-sqrt | dataset, "
                                           "optionally NAME:CAP)")
    p.add_argument("--workers", type=_count, default=1, help="Ray Train workers per training trial")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--cpus-per-trial", type=float, help="sampling trials: CPUs (and torch threads); default 1")
    p.add_argument("--gpu", action="store_true", help="a GPU per training worker / sampling trial")
    p.add_argument("--grace-epochs", type=_count, default=1, help="ASHA: epochs before a trial can be stopped")
    p.add_argument("--reduction-factor", type=_whole(2), default=2, help="ASHA: keep 1/N of the trials per rung")
    p.add_argument("--model", help="sampling search alone: the diffusion model to tune "
                                   "(default models:/genseg-diffusion@champion)")
    p.add_argument("--segmenter", help="sampling search: the segmenter whose features and mIoU score the samples "
                                       "(default models:/genseg-segmenter@champion)")
    p.add_argument("--num", type=_count, help="sampling search: val label maps per trial (default 64)")
    p.add_argument("--split", help="sampling search: the split whose label maps and images score the samples "
                                   "(default val; `tune seg` scores on --set select_on=SPLIT)")
    p.add_argument("--seed", type=int, default=0,
                   help="the search's seed (random/tpe proposals; sampling: label maps and noise); "
                        "a training seed is --set seed=N")
    p.add_argument("--batch-size", type=_count, help="sampling search: images per sampling batch (default 16)")
    p.add_argument("--min-fraction", type=float,
                   help="sampling objective: samples' segmenter mIoU must reach this fraction of the real ceiling "
                        "(default 0.9)")
    _champion_flags(p, "the winner")
    p.add_argument("--json", help="write the search summary (all trials, best config and metrics) here")
    _runtime_flags(p)

    p = sub.add_parser("serve", help="serve the champion models over HTTP on Ray Serve (until Ctrl-C / SIGTERM)",
                       description="Deploy the segmenter and the generator (registry champions by default) as "
                                   "autoscaling Ray Serve replicas behind an HTTP API and a web page at /. Registry "
                                   "aliases are followed: a new champion is served within --poll-interval seconds.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_whole(1), default=8000)
    p.add_argument("--segmenter", default="models:/genseg-segmenter@champion", help="segmenter REF")
    p.add_argument("--generator", default="models:/genseg-diffusion@champion",
                   help="diffusion or GAN REF (e.g. models:/genseg-gan@champion)")
    p.add_argument("--poll-interval", type=float, default=30.0,
                   help="seconds between checks for a moved champion alias (0: never)")
    p.add_argument("--threads", type=_whole(1), default=1, help="torch threads per model replica")
    p.add_argument("--max-steps", type=_whole(1), default=250, help="most sampler steps a request may ask for")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds before a synthesis or edit request is cut with a 504")
    p.add_argument("--detach", action="store_true",
                   help="with --ray-address: deploy onto the cluster and return, leaving the app running")
    _runtime_flags(p)

    p = sub.add_parser("submit", help="run a genseg command on a Ray cluster as a Ray Job; stream its output",
                       usage="genseg submit [--address URL] [options] -- COMMAND [ARGS ...]",
                       description="Ship this source tree (without .venv, run outputs, caches, data) as the job's "
                                   "working_dir, run `genseg COMMAND ...` there, stream its output and exit with the "
                                   "job's status (0 succeeded, 1 failed, 130 stopped).")
    p.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS, "
                                     "else http://127.0.0.1:8265)")
    p.add_argument("--workdir", help="the job's workdir, a path the cluster's nodes share (default: this machine's "
                                     "workdir, absolute)")
    p.add_argument("--tracking-uri", help="the job's MLflow URI; on a cluster an `mlflow server`, http://HOST:5000 "
                                          "(default: this machine's)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment for the job")
    p.add_argument("--python", default="python", help="the python the head runs the job with (default: python "
                                                       "on the head's PATH)")
    p.add_argument("--job-id", help="the job's submission id (default: Ray picks one)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("command_args", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="the genseg command to run, e.g. -- train seg --data /shared/shards")
    p.set_defaults(ray_address=None)

    p = sub.add_parser("jobs", help="list, follow or stop the genseg jobs on a Ray cluster")
    p.add_argument("action", choices=("list", "logs", "stop"))
    p.add_argument("id", nargs="?", help="the job's id (logs, stop)")
    p.add_argument("--address", help="the cluster's dashboard (default $RAY_API_SERVER_ADDRESS, else "
                                     "http://127.0.0.1:8265)")
    p.add_argument("--follow", "-f", action="store_true", help="logs: stream until the job ends")
    p.set_defaults(ray_address=None, workdir=None, tracking_uri=None)

    p = sub.add_parser("demo", help="synthetic data -> segmentation, diffusion and GAN training -> eval -> samples "
                                    "-> serving")
    p.add_argument("--epochs", type=int, default=8, help="segmentation epochs")
    p.add_argument("--diffusion-epochs", type=int, default=10)
    p.add_argument("--gan-epochs", type=int, default=10)
    p.add_argument("--num", type=int, default=240)
    p.add_argument("--size", type=_size, default=(32, 48),
                   help="scene size; above 32x48 the generative models still work at 32x48 and a second "
                        "segmenter is trained there to score them")
    p.add_argument("--keep-serving", action="store_true",
                   help="leave the served models (and the web page) up at the end until Ctrl-C")
    _runtime_flags(p)
    return parser


def cmd_prepare(args, rt) -> int:
    from jobs.runtime import init_ray
    from pipelines import sources
    from pipelines.prepare import check_out, prepare

    sources.check_val_fraction(args.val_fraction)
    if args.binary_masks and args.source != "folder":
        raise UsageError("--binary-masks applies to --source folder only")
    holdout = sources.holdout_prefixes(args.holdout)
    if holdout and args.source == "synthetic":
        raise UsageError("--holdout applies to --source camvid and --source folder (named sequences), not synthetic")
    check_out(args.out)          # before any work: an --out that holds a user's files is refused
    if args.source == "synthetic":
        src = sources.synthetic(args.num, args.size or (128, 160), args.seed, args.val_fraction)
        size, desc = None, {"source": "synthetic", "num": args.num, "seed": args.seed,
                            "size": list(args.size or (128, 160))}
    elif args.source == "camvid":
        if not args.root:
            raise UsageError("--source camvid needs --root DIR")
        splits = [s for s in args.splits.split(",") if s]
        src = sources.camvid(args.root, splits, holdout)
        size, desc = args.size, {"source": "camvid", "root": str(Path(args.root).resolve()), "splits": splits}
    else:
        if not (args.images and args.masks):
            raise UsageError("--source folder needs --images DIR and --masks DIR")
        src = sources.folder(args.images, args.masks, args.num_classes, args.palette, args.val_fraction, args.seed,
                             binary_masks=args.binary_masks, holdout=holdout)
        size, desc = args.size, {"source": "folder", "images": str(Path(args.images).resolve()),
                                 "masks": str(Path(args.masks).resolve())}
    if holdout:
        desc["holdout"] = holdout
    init_ray(rt)
    manifest = prepare(src, args.out, size=size, skip_bad=args.skip_bad, num_classes=args.num_classes,
                       description=desc, codec=args.codec, chunk=args.chunk, progress=sys.stdout.isatty())
    counts = ", ".join(f"{s}: {v['count']}" for s, v in manifest["splits"].items())
    n = sum(v["count"] for v in manifest["splits"].values())
    print(f"wrote {args.out}: {counts}; {manifest['num_classes']} classes; sizes {manifest['sizes'][:3]}; "
          f"{manifest['codec']} {manifest['bytes'] / 2**20:.1f} MiB; {manifest['seconds']:.1f}s "
          f"({n / max(manifest['seconds'], 1e-9):.0f} pairs/s)")
    if manifest["skipped"]:
        print(f"skipped {len(manifest['skipped'])} bad pair(s):")
        for line in manifest["skipped"][:20]:
            print(f"  - {line}")
    return 0


def cmd_encode(args, rt) -> int:
    import tempfile

    from jobs.runtime import init_ray
    from pipelines.latents import encode_shards

    with tempfile.TemporaryDirectory(prefix="genseg-vae-") as tmp:
        resolved, vae = _resolve(args.vae, rt, tmp, "vae")
        init_ray(rt)
        m = encode_shards(args.data, resolved.path, args.out, vae_ref=resolved.label, size=args.size,
                          actors=args.actors, progress=sys.stdout.isatty())
    n = sum(v["count"] for v in m["splits"].values())
    lat = m["latent"]
    print(f"wrote {args.out}: {n} images at {lat['image_size'][0]}x{lat['image_size'][1]} -> latents "
          f"{lat['channels']}x{m['size'][0]}x{m['size'][1]} (factor {lat['factor']}, scale {lat['scale']:.4f}) by "
          f"{lat['vae']}; {m['bytes'] / 2**20:.1f} MiB; {m['seconds']:.1f}s")
    return 0


SEG_ONLY = ("arch", "backbone", "class_weights", "select_on")
GENERATIVE_ONLY = ("cond",)
GAN_ONLY = ("loss",)


def task_config(args):
    """The task's config dataclass: YAML preset, then named flags, then ``--set`` overrides."""
    from genseg import config as config_lib
    from genseg.config import DiffusionConfig, GANConfig, SegConfig, VAEConfig

    cls = {"seg": SegConfig, "diffusion": DiffusionConfig, "gan": GANConfig, "vae": VAEConfig}[args.task]
    wrong = {"seg": GENERATIVE_ONLY + GAN_ONLY, "diffusion": SEG_ONLY + GAN_ONLY, "gan": SEG_ONLY,
             "vae": SEG_ONLY + GENERATIVE_ONLY + GAN_ONLY}[args.task]
    for flag in wrong:
        if getattr(args, flag, None) is not None:
            raise UsageError(f"--{flag.replace('_', '-')} does not apply to `train {args.task}`")
    cfg = config_lib.load_yaml(cls, args.config) if args.config else cls()
    named = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "arch": args.arch,
             "backbone": args.backbone, "cond": args.cond, "loss": args.loss,
             "select_on": getattr(args, "select_on", None)}
    over = {k: v for k, v in named.items() if v is not None}
    over.update(config_lib.parse_overrides(args.set))
    return config_lib.replace(cfg, over)


def _check_miou_margin(args) -> None:
    """A segmenter competes on an mIoU, a fraction in [0, 1]: a margin of 1 or more could never be
    cleared, and is most likely meant in points (1.5 for 0.015)."""
    if args.task == "seg" and args.champion_margin >= 1:
        raise UsageError(f"--champion-margin {args.champion_margin:g} can never be cleared: a segmenter's mIoU is a "
                         f"fraction from 0 to 1, so {args.champion_margin:g} points is "
                         f"{args.champion_margin / 100:g}")


def cmd_train(args, rt) -> int:
    from jobs.runtime import hold_run, init_ray, interruptible, prepare_tracking
    from pipelines.shards import check_split

    cfg = task_config(args)
    _check_miou_margin(args)
    for split in ("train", "val"):   # before Ray starts: a missing, empty, corrupted or label-less split
        check_split(args.data, split, need_labels=args.task == "seg")
    if args.task == "seg":
        from jobs import train_seg as job
    elif args.task == "gan":
        from jobs import train_gan as job
    elif args.task == "vae":
        from jobs import train_vae as job
    else:
        from jobs import train_diffusion as job
    if args.latent and args.task != "diffusion":
        raise UsageError(f"--latent applies to `train diffusion`, not `train {args.task}`")
    from genseg.data.shards import read_manifest

    if args.task == "seg":       # the weighting and the selection split, before Ray starts
        manifest = read_manifest(args.data)
        # train and val were checked above; the other scored splits (e.g. holdout) here
        for split in job.eval_splits(Path(args.data), manifest, job.build_config(manifest, cfg, args.class_weights))[1:]:
            check_split(args.data, split, need_labels=True)
    elif not args.latent:        # the model the data implies (e.g. a GAN's size), before Ray starts
        job.build_config(read_manifest(args.data), cfg, Path(args.data))
    # the run name is ours until we return (a second `train --run-name` of it is refused)
    with hold_run(rt.workdir, args.run_name, args.task) as run_name:
        try:
            prepare_tracking(rt, job.TASK.experiment)
            init_ray(rt)
            common = dict(workers=args.workers, gpu=args.gpu, run_name=run_name, max_failures=args.max_failures,
                          cpus_per_worker=args.cpus_per_worker, promote=args.promote, spread=args.spread,
                          champion_margin=args.champion_margin)
            extra = {"class_weights": args.class_weights} if args.task == "seg" else {}
            if args.latent:
                extra["latent"] = args.latent
            summary = interruptible(job.run, args.data, cfg, rt, **extra, **common)
        except KeyboardInterrupt:
            _mark_interrupted(job.TASK.experiment, run_name, job.TASK.job)
            raise Interrupted(f"interrupted; run '{run_name}' keeps its checkpoints. Resume it with: "
                              f"{_resume_command(args, run_name)}") from None
    reg = summary.get("registered")
    score = summary["best_score"]
    shown = (f"{100 * score:.2f}" if summary["score"].endswith("_miou") else
             {"val_psnr": f"{score:.2f} dB"}.get(summary["score"], f"{score:.4f}"))
    print(f"run '{summary['run_name']}': epoch {summary['final_epoch'] + 1} done, best {summary['score']} "
          f"{shown} (epoch {summary['best_epoch'] + 1})")
    if reg:
        if reg["champion"]:
            print(f"registered {reg['name']} version {reg['version']} as champion: {reg['reason']}")
        else:
            print(f"registered {reg['name']} version {reg['version']}; the champion stays version "
                  f"{reg['previous_champion']}: {reg['reason']}")
    print(f"best checkpoint: {summary['best_checkpoint']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    return 0


def _resume_command(args, run_name: str, flag: str = "--run-name") -> str:
    """The command line that was run, with ``flag`` (``--run-name``, ``--name``) set to the run it started."""
    import shlex

    argv, out, skip = list(getattr(args, "argv", None) or sys.argv[1:]), [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return shlex.join(["genseg", *out, flag, run_name])


def _mark_interrupted(experiment: str, run_name: str, job: str) -> None:
    """Best effort: the MLflow run of an interrupted training says KILLED, not RUNNING forever."""
    try:
        import mlflow
        from mlflow.tracking import MlflowClient

        from genseg import tracking

        exp = mlflow.get_experiment_by_name(experiment)
        run = tracking.find_run(exp.experiment_id, run_name, job) if exp is not None else None
        if run is not None and run.info.status == "RUNNING":
            MlflowClient().set_terminated(run.info.run_id, status="KILLED")
    except Exception:   # the store may be what was interrupted; resuming sets the status again
        pass


def _resolve(ref: str, rt, tmp: str, expect: str, device: str = "cpu"):
    """REF -> (resolved, loaded model): the one path every command takes to a model."""
    from genseg import tracking
    from genseg.loading import load

    resolved = tracking.resolve(ref, rt.tracking_uri, dst=tmp)
    return resolved, load(resolved, expect=expect, device=device)


def cmd_eval(args, rt) -> int:
    import tempfile

    from genseg import tracking
    from jobs import eval_seg

    seg_only = [f for f, on in (("--tta-flip", args.tta_flip), ("--tta-scales", args.tta_scales),
                                ("--pictures", args.pictures)) if on]
    if args.task == "gen" and seg_only:
        raise UsageError(f"{', '.join(seg_only)} applies to `eval seg`, not `eval gen`")
    if args.pictures_num is not None and not args.pictures:
        raise UsageError("--pictures-num needs --pictures PNG (where to write them)")
    if args.pictures:
        eval_seg.check_picture_path(args.pictures)
    tracking.setup(rt.workdir, rt.tracking_uri)
    if args.task == "gen":
        from jobs import eval_gen

        ref = args.model or "models:/genseg-diffusion@champion"
        with tempfile.TemporaryDirectory() as tmp:
            dres, gen = _resolve(ref, rt, f"{tmp}/d", "generator", args.device)
            sres, seg = _resolve(args.segmenter, rt, f"{tmp}/s", "segmenter", args.device)
            res = eval_gen.run(gen, seg, args.data, split=args.split, num=args.num, seed=args.seed,
                               inpaint_num=args.inpaint_num, model_ref=dres.describe(),
                               segmenter_ref=sres.describe(), **_sampling(args))
        res["model"], res["segmenter"] = dres.to_dict(), sres.to_dict()
        print(eval_gen.format_report(res))
        if args.json:
            eval_seg.write_json(res, args.json)
            print(f"wrote {args.json}")
        return 0
    ref = args.model or "models:/genseg-segmenter@champion"
    with tempfile.TemporaryDirectory() as tmp:
        resolved, seg = _resolve(ref, rt, tmp, "segmenter", args.device)
        res = eval_seg.run(seg, args.data, args.split, args.infer_scale, args.limit, flip=args.tta_flip,
                           scales=args.tta_scales, pictures=args.pictures, pictures_num=args.pictures_num or 4)
    res["model"] = resolved.to_dict()
    res["model_ref"] = resolved.describe()
    print(f"{resolved.describe()} on {args.data} [{args.split}], {res['images']} images at their own resolution")
    tta = res["protocol"]["tta"]
    if tta["flip"] or tta["scales"] != [1.0]:
        print(f"test-time augmentation: flip {'on' if tta['flip'] else 'off'}, scales "
              f"{','.join(f'{v:g}' for v in tta['scales'])} (logits averaged before argmax)")
    print(eval_seg.format_table(res))
    if args.pictures:
        print(f"wrote {args.pictures}")
    if args.json:
        eval_seg.write_json(res, args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_sample(args, rt) -> int:
    import tempfile

    from genseg import tracking
    from jobs import sample_job

    tracking.setup(rt.workdir, rt.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        from genseg.loading import load

        resolved = tracking.resolve(args.model, rt.tracking_uri, dst=tmp)
        gen = load(resolved, expect="generator", device=args.device, weights=args.weights)
        res = sample_job.run(gen, args.out, num=args.num, masks=args.masks, split=args.split, seed=args.seed,
                             batch_size=args.batch_size, **_sampling(args))
    res["model"] = resolved.to_dict()
    sample_job.write_summary(res, args.out)
    s = res["sampling"]
    print(f"wrote {res['num']} samples and {res['grid']} from {resolved.describe()} ({res['sampling_desc']}, "
          f"{res['seconds_per_image']:.2f} s/image)")
    return 0


def cmd_edit(args, rt) -> int:
    import tempfile

    from genseg import imageio, tracking
    from genseg.editing import EditOptions
    from jobs import edit_job

    tracking.setup(rt.workdir, rt.tracking_uri)
    if args.label_map and not args.extend:
        raise UsageError("--label-map goes with --extend (for --background, the label map is its argument)")
    opts = EditOptions(resample=args.resample, dilate=args.dilate, feather=args.feather, seed=args.seed,
                       crop=args.crop, margin=args.margin)
    if args.extend:
        edit_job.parse_extend(args.extend)       # a bad --extend fails before any model is loaded
    image = imageio.read_image(args.image)      # a bad image fails before any model is loaded
    with tempfile.TemporaryDirectory() as tmp:
        dres, gen = _resolve(args.model, rt, f"{tmp}/d", "generator", args.device)
        sres, seg = _resolve(args.segmenter, rt, f"{tmp}/s", "segmenter", args.device)
        res = edit_job.run(gen, seg, image, args.out, remove=args.remove, background=args.background,
                           keep=args.keep, extend=args.extend, label_map=args.label_map, opts=opts,
                           sampling=_sampling(args))
    res["model"], res["segmenter"] = dres.to_dict(), sres.to_dict()
    edit_job.write_summary(res, args.out)
    seam = res["boundary"]["ratio"]
    seam = f"; seam contrast {seam:.2f}x the fill's own" if math.isfinite(seam) else ""
    print(f"wrote {res['out']} ({res['out_size'][0]}x{res['out_size'][1]}, {res['edited_pixels']} pixels edited; "
          f"region in {res['mask']}{seam})")
    return 0


def tune_options(args):
    """The search as asked, checked before Ray starts: base config, spaces, objective."""
    from genseg import config as config_lib
    from genseg.config import DiffusionConfig, SegConfig
    from genseg.data.shards import read_manifest
    from genseg.tuning import Objective, load_space_file
    from jobs import tune

    if args.task == "seg" and args.stage != "all":
        raise UsageError("--stage applies to `tune diffusion` only (its stages: schedule, sampling)")
    _check_miou_margin(args)
    if args.task == "diffusion" and args.class_weights:
        raise UsageError("--class-weights applies to `tune seg` only")
    # the sampling search's flags: left unset, the search's own defaults (TuneOptions, Objective) apply
    sampling = {f: getattr(args, f) for f in SAMPLING_FLAGS if getattr(args, f) is not None}
    if args.task == "seg" and sampling:       # they would be silently ignored
        hints = {"--split": "score on another split with --set select_on=SPLIT",
                 "--batch-size": "the training batch is --set batch_size=N"}
        given = ["--" + f.replace("_", "-") for f in sampling]
        hint = "; ".join(hints[f] for f in given if f in hints)
        raise UsageError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to the sampling search "
                         f"of `tune diffusion`, not `tune seg`" + (f" ({hint})" if hint else ""))
    stages = ("seg",) if args.task == "seg" else (("schedule", "sampling") if args.stage == "all" else (args.stage,))
    spaces = tune.spaces_for(args.task, load_space_file(args.space) if args.space else None)
    cls = SegConfig if args.task == "seg" else DiffusionConfig
    base = config_lib.load_yaml(cls, args.config) if args.config else cls()
    over = {"epochs": args.epochs} if args.epochs else {}
    over.update(config_lib.parse_overrides(args.set))
    base = config_lib.replace(base, over)
    manifest = read_manifest(args.data)
    if args.task == "seg":
        from jobs import train_seg

        base = train_seg.build_config(manifest, base, args.class_weights)
        from pipelines.shards import check_split

        for split in train_seg.eval_splits(Path(args.data), manifest, base)[1:]:   # e.g. holdout
            check_split(args.data, split, need_labels=True)
    else:
        from jobs import runner

        base = runner.fill_from_manifest(manifest, base, Path(args.data))
    for stage in stages:
        if stage in ("schedule", "seg"):
            tune.check_training_space(spaces[stage], base, stage)
    if "sampling" in stages and "schedule" in stages:
        from genseg.generation import SamplingSettings

        # steps must fit every T the schedule search may pick
        ts = spaces["schedule"].fields.get("timesteps")
        t_min = min(ts.ends() if hasattr(ts, "ends") else ts) if ts is not None else base.timesteps
        tune.check_sampling_space(spaces["sampling"], SamplingSettings(base.sampler, base.sample_steps, base.guidance),
                                  int(t_min))
    if args.search == "grid":        # a range in a grid is refused before any trial starts
        for stage in stages:
            spaces[stage].check_grid()
    objective = Objective(**{k: sampling.pop(k) for k in ("min_fraction",) if k in sampling})
    return tune.TuneOptions(
        data=args.data, name=args.name or "", stages=stages, spaces={s: spaces[s] for s in stages}, base=base,
        search=args.search, samples=args.samples, max_concurrent=args.max_concurrent, workers=args.workers,
        cpus_per_worker=args.cpus_per_worker, gpu=args.gpu, grace_epochs=args.grace_epochs,
        reduction_factor=args.reduction_factor, seed=args.seed, class_weights=args.class_weights,
        objective=objective, promote=args.promote, champion_margin=args.champion_margin, **sampling)


def cmd_tune(args, rt) -> int:
    import dataclasses

    from jobs import tune
    from jobs.runtime import hold_run, init_ray, interruptible, prepare_tracking
    from pipelines.shards import check_split

    for split in ("train", "val") if args.stage != "sampling" else (args.split or tune.TuneOptions.split,):
        check_split(args.data, split, need_labels=True)
    opts = tune_options(args)
    with hold_run(rt.workdir, args.name, f"tune-{args.task}") as name:
        opts = dataclasses.replace(opts, name=name)
        tune.check_same_search(opts, rt)       # before Ray starts or MLflow is touched
        try:
            prepare_tracking(rt, "genseg-seg" if args.task == "seg" else "genseg-diffusion")
            init_ray(rt)
            out = interruptible(tune.run, args.task, opts, rt)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; search '{name}' keeps its finished trials. Continue it with: "
                              f"{_resume_command(args, name, '--name')}") from None
    print(tune.format_summary(out))
    if args.json:
        slim = {**out, "stages": {k: {kk: vv for kk, vv in v.items() if kk != "table"} for k, v in out["stages"].items()}}
        Path(args.json).write_text(json.dumps(slim, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


def cmd_serve(args, rt) -> int:
    from genseg import tracking
    from serve_app import server
    from serve_app.options import AppOptions

    if args.port > 65535:
        raise UsageError(f"--port {args.port} is not a TCP port (1..65535)")
    tracking.setup(rt.workdir, rt.tracking_uri)
    opts = AppOptions(segmenter=args.segmenter, generator=args.generator, poll_interval_s=args.poll_interval,
                      threads=args.threads, max_steps=args.max_steps, generate_timeout_s=args.timeout)
    return server.run(rt, opts, host=args.host, port=args.port, detach=args.detach)


def cmd_submit(args, rt) -> int:
    from jobs.submit import submit

    return submit(args, rt)


def cmd_jobs(args, rt) -> int:
    from jobs.submit import jobs_command

    return jobs_command(args, rt)


def cmd_demo(args, rt) -> int:
    from jobs import demo

    return demo.run(rt, epochs=args.epochs, num=args.num, size=args.size, diffusion_epochs=args.diffusion_epochs,
                    gan_epochs=args.gan_epochs, keep_serving=args.keep_serving)


class UsageError(Exception):
    pass


class Interrupted(Exception):
    """Ctrl-C, with what to do next; exits 130 like any interrupted command."""


COMMANDS = {"prepare": cmd_prepare, "encode": cmd_encode, "train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "edit": cmd_edit,
            "tune": cmd_tune, "serve": cmd_serve, "demo": cmd_demo, "submit": cmd_submit, "jobs": cmd_jobs}


def _known_errors() -> tuple[type, ...]:
    from genseg.errors import InputError

    from jobs.runtime import RayStartError

    return (UsageError, InputError, FileNotFoundError, RayStartError)


def _preflight(args, rt) -> None:
    """Checks that need no work done, before any is: a cluster address that answers, and the
    shard directories a command reads (present, intact Parquet footers, rows in the split and,
    for segmentation scores, at least one labelled pixel)."""
    from pipelines.shards import check_split

    if args.command not in ("submit", "jobs"):
        from genseg.tracking import check_server

        check_server(rt.tracking_uri)
    if args.command in ("prepare", "train", "tune", "demo") and rt.ray_address not in (None, "auto", "local"):
        from jobs.runtime import check_reachable

        check_reachable(rt.ray_address)
    elif args.command in ("prepare", "train", "tune", "demo") and os.environ.get("GENSEG_DASHBOARD_PORT"):
        from jobs.runtime import dashboard_port

        dashboard_port()   # a port number, and free (checked again when Ray starts)
    if args.command == "eval":
        check_split(args.data, args.split, need_labels=args.task == "seg")
    elif args.command == "sample" and getattr(args, "masks", None):
        check_split(args.masks, args.split, need_labels=False)


INTERRUPTED = {"prepare": "interrupted; nothing was written (an earlier output is unchanged)"}


def main(argv: list[str] | None = None) -> int:
    """The CLI; SIGTERM stops it as Ctrl-C does (jobs.runtime.sigterm_as_interrupt)."""
    import signal

    from jobs.runtime import sigterm_as_interrupt

    previous = sigterm_as_interrupt()
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    from jobs.runtime import quiet_logging, ray_logs_dir, resolve

    rt = resolve(args.workdir, args.tracking_uri, args.ray_address, verbose=getattr(args, "verbose", False))
    quiet_logging(rt.verbose)
    known = _known_errors()
    try:
        _preflight(args, rt)
        return COMMANDS[args.command](args, rt)
    except known as exc:
        print(f"genseg {args.command}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, (UsageError,)) else 1
    except Interrupted as exc:
        print(f"genseg {args.command}: {exc}", file=sys.stderr)
        return 130
    except Exception as exc:   # a failed Ray Train run: say why in one line; Ray's logs say more
        if type(exc).__name__ not in ("TrainingFailedError", "WorkerGroupError", "ControllerError"):
            raise
        last = [ln for ln in str(exc).splitlines() if ln.strip()]
        logs = ray_logs_dir()
        print(f"genseg {args.command}: error: training failed: {last[-1] if last else type(exc).__name__}"
              + (f" (Ray's logs: {logs})" if logs else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"genseg {args.command}: {INTERRUPTED.get(args.command, 'interrupted')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
