"""Shards -> latent shards: every image encoded once by a trained autoencoder, as Ray Data batch
inference on actors (``genseg encode``, and ``genseg train diffusion --latent`` through its cache).

Each split is read from its Parquet files and streamed through a pool of :class:`Encoder` actors
(each loads the autoencoder once and keeps it).  An actor decodes a batch, resizes it to the
encoding size, encodes it to the posterior means times the autoencoder's ``latent_scale``, pools
each label map to the latent grid (:func:`genseg.diffusion.conditioning.pool_labels`: the majority
class of each cell) and writes the rows as one Parquet file.  The output is an ordinary shard
directory (codec ``latent``, see genseg.data.shards) whose manifest names the autoencoder and the
source, with a copy of the autoencoder's checkpoint in ``vae/``: a latent diffusion run, and the
models it saves, carry the decoder they were trained for.  Like ``prepare``, it is built in a
temporary directory beside the output and swapped in complete.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import ray

from genseg.data.shards import LATENT, MANIFEST, decode_batch, encode_latent_row
from genseg.errors import InputError
from genseg.fsutil import swap_dir
from pipelines.shards import check_files, load_manifest, shard_files

BATCH = 16


class LatentError(InputError):
    """The shards, the autoencoder or the size cannot make latent shards (one line)."""


def encoding_size(manifest: dict, size: tuple[int, int] | None, factor: int, data: str | Path) -> tuple[int, int]:
    """The (H, W) images are encoded at: ``size`` when given, else the shards' one size; a multiple of
    the autoencoder's factor either way."""
    if size is None:
        if manifest.get("size") is None:
            raise LatentError(f"{data} holds images of several sizes; pass --size HxW to encode them at one")
        size = tuple(manifest["size"])
    h, w = size
    if h % factor or w % factor:
        raise LatentError(f"images of {h}x{w} do not encode with an autoencoder of factor {factor}: both sides must "
                          f"be multiples of {factor} (pass --size, e.g. {h - h % factor}x{w - w % factor})")
    return h, w


class Encoder:
    """A Ray Data actor: loads the autoencoder once, then encodes each batch and writes it as one Parquet
    file per split it holds (rows carry their source file's ``path``; its folder is the split)."""

    def __init__(self, vae_dir: str, out_dir: str, size: tuple[int, int], num_classes: int, ignore_index: int,
                 threads: int = 1):
        import torch

        from genseg.loading import load

        torch.set_num_threads(threads)
        self.vae = load(vae_dir, expect="vae")
        self.out, self.size = Path(out_dir), tuple(size)
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def __call__(self, batch: dict) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch

        from genseg.data.transforms import resize_pair
        from genseg.diffusion.conditioning import pool_labels

        xs, ms = [], []
        for image, mask in decode_batch(batch):
            x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1
            x, m = resize_pair(x, torch.from_numpy(np.array(mask)).long(), self.size)
            xs.append(x)
            ms.append(m)
        z = self.vae.encode(torch.stack(xs))
        grid = pool_labels(torch.stack(ms), self.vae.factor, self.num_classes, self.ignore_index)
        names = [str(n) for n in batch["name"]]
        splits = [Path(str(p)).parent.name for p in batch["path"]]
        written, nbytes = 0, 0
        for split in sorted(set(splits)):        # a batch can straddle two splits' files
            idx = [i for i, s in enumerate(splits) if s == split]
            rows = [encode_latent_row(names[i], z[i].numpy(), grid[i].to(torch.uint8).numpy()) for i in idx]
            table = pa.Table.from_pylist(rows)
            stem = hashlib.sha256("\n".join(sorted(names[i] for i in idx)).encode()).hexdigest()[:16]
            (self.out / split).mkdir(exist_ok=True)
            pq.write_table(table, self.out / split / f"part-{stem}.parquet")
            written, nbytes = written + len(rows), nbytes + int(table.nbytes)
        return {"rows": np.array([written]), "bytes": np.array([nbytes])}


def encode_shards(data: str | Path, vae_dir: str | Path, out: str | Path, *, vae_ref: str, size=None,
                  actors: int = 2, progress: bool = False) -> dict:
    """Encode every split of the shards in ``data`` with the autoencoder checkpoint ``vae_dir`` into
    latent shards at ``out`` -> their manifest.  Ray must already be initialised."""
    from genseg import checkpoint as ckpt_lib
    from genseg.config import VAEConfig
    from genseg.loading import WrongModelKind

    data, out = Path(data).resolve(), Path(out).resolve()
    manifest = load_manifest(data)
    if manifest.get("codec") == LATENT:
        raise LatentError(f"{data} already holds latents; encode the pixel shards they came from")
    for split in manifest["splits"]:
        check_files(data, split, manifest)
    vae = ckpt_lib.header(vae_dir)        # the actors load the weights; the driver needs the shape of things
    if not isinstance(vae.config, VAEConfig):
        raise WrongModelKind(f"{vae_dir} holds a {type(vae.config).__name__} model, but encode needs an "
                             f"autoencoder (genseg train vae)")
    factor = vae.config.factor
    size = encoding_size(manifest, tuple(size) if size else None, factor, data)
    grid = (size[0] // factor, size[1] // factor)
    if out.exists() and not (out / MANIFEST).is_file():
        raise LatentError(f"--out {out} exists and is not a shard directory; choose another path")
    start = time.perf_counter()
    ray.data.DataContext.get_current().enable_progress_bars = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        total = sum(v["count"] for v in manifest["splits"].values())
        bar = _bar(total, progress)
        nbytes = 0
        files = [str(f) for split in manifest["splits"] for f in shard_files(data, split)]
        ds = ray.data.read_parquet(files, include_paths=True)       # the path names each row's split
        with warnings.catch_warnings():
            # max_restarts=0: a restartable actor whose constructor arguments sit in the object store
            # makes Ray core log an error line at each start (ray-project/ray#53727); Ray 2.60 takes the
            # option only through the deprecated **ray_remote_args.  A failed encode is run again.
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map_batches(Encoder, batch_size=BATCH, batch_format="numpy",
                                compute=ray.data.ActorPoolStrategy(size=max(1, actors)), num_cpus=1, max_restarts=0,
                                fn_constructor_kwargs={"vae_dir": str(vae_dir), "out_dir": str(tmp), "size": size,
                                                       "num_classes": manifest["num_classes"],
                                                       "ignore_index": manifest["ignore_index"]})
        for res in ds.iter_batches(batch_size=None, batch_format="numpy"):
            bar.update(int(res["rows"].sum()))
            nbytes += int(res["bytes"].sum())
        bar.close()
        (tmp / "vae").mkdir()
        for f in Path(vae.path).iterdir():     # the weights and config; not the optimizer state
            if f.name == ckpt_lib.CONFIG_FILE or f.suffix == ".safetensors":
                shutil.copy2(f, tmp / "vae" / f.name)
        latent = {"vae": vae_ref, "vae_digest": ckpt_lib.weights_digest(vae_dir), "factor": factor,
                  "channels": vae.config.latent_channels, "scale": float(vae.meta.get("latent_scale", 1.0)), "image_size": list(size),
                  "source": str(data), "source_format": manifest.get("format"), "source_codec": manifest.get("codec")}
        out_manifest = {**manifest, "codec": LATENT, "size": list(grid), "sizes": [list(grid)], "latent": latent,
                        "bytes": nbytes, "seconds": round(time.perf_counter() - start, 3)}
        (tmp / MANIFEST).write_text(json.dumps(out_manifest, indent=2))
        for split in manifest["splits"]:
            check_files(tmp, split, out_manifest)        # every row written, every file readable
        swap_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_manifest


def _bar(total: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="encode", unit="image", disable=not show, file=sys.stdout, mininterval=0.5,
                leave=False)


def cache_key(data: str | Path, vae_dir: str | Path, size=None) -> str:
    """Latent shards are reused while the pixel shards (their manifest), the autoencoder's weights and
    the encoding size are the same."""
    from genseg import checkpoint as ckpt_lib

    h = hashlib.sha256((Path(data) / MANIFEST).read_bytes())
    h.update(ckpt_lib.weights_digest(vae_dir).encode())
    h.update(json.dumps(list(size) if size else None).encode())
    return h.hexdigest()[:16]

