"""The one checkpoint format, used by training resume, evaluation and serving.

A checkpoint is a directory:

    config.json        {"format": 2, "type": "SegConfig", "fields": {...}, "meta": {epoch, metrics, classes},
                        "files": {name: {"bytes": n, "sha256": hex}}}
    model.safetensors  model weights (tensors only, no pickled code)
    <name>.safetensors extra weights, e.g. ema.safetensors
    train_state.pt     optimizer / scheduler / epoch / RNG states, for resuming; read with weights_only=True

Nothing here executes code from the file: weights go through safetensors and the training
state through ``torch.load(weights_only=True)``.

Durability: :func:`save` writes a hidden temporary directory, then moves the old checkpoint
aside, renames the new one in and only then deletes the old one, so at every instant one complete
checkpoint exists under the name or its aside name; :func:`load` falls back to the aside copy
when a crash left only that.  ``files`` records each file's size and SHA-256, so a truncated or
damaged file is reported by name instead of loading garbage.

Formats: 1 (no ``format`` key, no ``files``) still loads.  A newer format, or a config field this
version does not know, is refused with a message saying what to do; a renamed field is mapped
through :data:`RENAMED_FIELDS`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from genseg import config as config_lib
from genseg.errors import InputError
from genseg.fsutil import asides, fsync, swap_dir

FORMAT = 2
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"

# Config fields renamed since checkpoints were first written: {config type: {old name: new name}}.
# A checkpoint that names an old field loads with its value under the new name.
RENAMED_FIELDS: dict[str, dict[str, str]] = {"SegConfig": {}, "DiffusionConfig": {}, "GANConfig": {}, "VAEConfig": {}}


def _from_format_1(doc: dict) -> dict:
    """Format 1 had no ``format`` key and no file digests; nothing else changed."""
    return {**doc, "format": 2}


# format N -> a function turning a format-N config.json document into format N + 1
MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _from_format_1}


class CheckpointError(InputError):
    """A directory is not a readable genseg checkpoint."""


@dataclass
class Checkpoint:
    config: Any                       # the job's frozen config dataclass
    state_dict: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    format: int = FORMAT              # the format the directory was written in

    @property
    def epoch(self) -> int:
        return int(self.meta.get("epoch", -1))


# ------------------------------------------------------------------ writing

def save(path: str | os.PathLike, model: torch.nn.Module, cfg: Any, *, epoch: int,
         metrics: dict | None = None, classes: dict | None = None,
         optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
         extra_meta: dict | None = None, extra_state: dict | None = None,
         extra_weights: dict[str, torch.nn.Module] | None = None,
         optimizers: dict[str, torch.optim.Optimizer] | None = None, schedulers: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory; an existing one at ``path`` is replaced only once the new
    one is complete on disk (see the module docstring).

    ``model`` is the model the checkpoint serves (``model.safetensors``); ``extra_weights`` saves
    more modules as ``<name>.safetensors`` (e.g. ``{"ema": ema_model, "discriminator": d}``).
    ``optimizers`` / ``schedulers`` are saved by name (``optimizer`` / ``scheduler`` are shorthand
    for the name ``"model"``); ``extra_state`` adds tensors/plain values to the resume state."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        module = getattr(model, "module", model)          # unwrap DDP
        save_file(_cpu_state(module), str(tmp / WEIGHTS_FILE))
        for name, extra in (extra_weights or {}).items():
            save_file(_cpu_state(getattr(extra, "module", extra)), str(tmp / f"{name}.safetensors"))
        optimizers = {**({"model": optimizer} if optimizer is not None else {}), **(optimizers or {})}
        schedulers = {**({"model": scheduler} if scheduler is not None else {}), **(schedulers or {})}
        if optimizers:
            torch.save({"epoch": epoch, "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                        "schedulers": {k: sc.state_dict() for k, sc in schedulers.items() if sc is not None},
                        **(extra_state or {})}, tmp / STATE_FILE)
        files = {}
        for f in sorted(tmp.iterdir()):
            fsync(f)
            files[f.name] = _describe(f)
        meta = {"epoch": epoch, "metrics": metrics or {}, "classes": classes, **(extra_meta or {})}
        doc = {"format": FORMAT, **json.loads(config_lib.to_json(cfg)), "meta": meta, "files": files}
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True, default=_json_default))
        fsync(tmp / CONFIG_FILE)
        fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_dir(tmp, path)
    return path


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def _describe(f: Path) -> dict:
    return {"bytes": f.stat().st_size, "sha256": _sha256(f)}


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_default(o):
    if isinstance(o, float):
        return o
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ------------------------------------------------------------------ reading

def _resolve(path: Path) -> Path:
    """``path``, or, when a crash during :func:`save` left only the aside copy of the previous
    checkpoint, that copy (renamed back into place when the directory is writable)."""
    if path.exists():
        return path
    complete = [p for p in asides(path) if (p / CONFIG_FILE).is_file()]
    if not complete:
        return path
    try:
        complete[-1].rename(path)
        return path
    except OSError:                   # read-only storage: read the aside copy where it lies
        return complete[-1]


def _read_doc(path: Path) -> tuple[dict, int]:
    """config.json migrated to the current format, and the format it was written in."""
    f = path / CONFIG_FILE
    try:
        doc = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{f}: unreadable checkpoint config ({exc})") from None
    if not isinstance(doc, dict) or "type" not in doc or not isinstance(doc.get("fields"), dict):
        raise CheckpointError(f"{f}: unreadable checkpoint config (needs 'type' and 'fields')")
    fmt = doc.get("format", 1)
    if not isinstance(fmt, int) or fmt < 1:
        raise CheckpointError(f"{f}: unknown checkpoint format {fmt!r}")
    if fmt > FORMAT:
        raise CheckpointError(f"{f}: checkpoint format {fmt} was written by a newer genseg (this one reads "
                              f"formats 1-{FORMAT}); upgrade genseg to load it")
    while doc.get("format", 1) < FORMAT:
        doc = MIGRATIONS[doc.get("format", 1)](doc)
    return doc, fmt


def _config(doc: dict, f: Path) -> Any:
    name = doc["type"]
    cls = config_lib.CONFIGS.get(name)
    if cls is None:
        raise CheckpointError(f"{f}: unknown config type {name!r} (this genseg knows "
                              f"{', '.join(config_lib.CONFIGS)}); load it with the genseg version that wrote it")
    renamed = RENAMED_FIELDS.get(name, {})
    fields = {}
    for k, v in doc["fields"].items():
        new = renamed.get(k, k)
        if new != k and new in doc["fields"]:
            continue                  # both spellings present: the new name wins
        fields[new] = v
    known = {fl.name for fl in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(
            f"{f}: config field(s) {', '.join(unknown)} no longer exist in {name}; the checkpoint comes from "
            f"another genseg version: load it with that version, or, if a field was renamed, map it in "
            f"genseg/checkpoint.py RENAMED_FIELDS")
    try:
        return config_lib.from_dict(cls, fields)
    except config_lib.ConfigError as exc:
        raise CheckpointError(f"{f}: unreadable checkpoint config ({exc})") from None


def _verify(path: Path, name: str, doc: dict | None) -> None:
    """Size and SHA-256 of ``name`` against config.json (checkpoints of format >= 2)."""
    want = ((doc or {}).get("files") or {}).get(name)
    if not want:
        return
    f = path / name
    size = f.stat().st_size
    if size != want.get("bytes", size):
        raise CheckpointError(f"{f}: truncated or damaged ({size} bytes, the checkpoint recorded {want['bytes']}); "
                              f"restore it from a copy (e.g. the MLflow run's artifacts) or use another checkpoint")
    if want.get("sha256") and _sha256(f) != want["sha256"]:
        raise CheckpointError(f"{f}: damaged (its SHA-256 differs from the one recorded in {CONFIG_FILE}); "
                              f"restore it from a copy (e.g. the MLflow run's artifacts) or use another checkpoint")


def _read_weights(path: Path, name: str, doc: dict | None) -> dict[str, torch.Tensor]:
    _verify(path, name, doc)
    f = path / name
    try:
        return load_file(str(f))
    except Exception as exc:          # any parse failure of the file: report it by name, not a traceback
        raise CheckpointError(f"{f}: unreadable weights file, truncated or damaged ({type(exc).__name__}: "
                              f"{exc}); restore it from a copy or use another checkpoint") from None


def _open(path: Path) -> tuple[Path, dict, int, Any]:
    """(resolved path, migrated config.json, its format, the config) of a checkpoint directory."""
    path = _resolve(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{path} is not a genseg checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    doc, fmt = _read_doc(path)
    return path, doc, fmt, _config(doc, path / CONFIG_FILE)


def _meta(doc: dict) -> dict:
    meta = doc.get("meta", {})
    return meta if isinstance(meta, dict) else {}


def load(path: str | os.PathLike) -> Checkpoint:
    """Read config and weights of a checkpoint directory."""
    path, doc, fmt, cfg = _open(Path(path))
    return Checkpoint(cfg, _read_weights(path, WEIGHTS_FILE, doc), _meta(doc), path, fmt)


def header(path: str | os.PathLike) -> Checkpoint:
    """Config and meta of a checkpoint directory, its weight files checked against the sizes and digests
    its config.json records but not read into tensors (``state_dict`` is empty): what a driver needs to
    plan work that workers load the weights for."""
    path, doc, fmt, cfg = _open(Path(path))
    for name in (doc.get("files") or {}):
        if name.endswith(".safetensors"):
            _verify(path, name, doc)
    return Checkpoint(cfg, {}, _meta(doc), path, fmt)


def _doc_or_none(path: Path) -> dict | None:
    return _read_doc(path)[0] if (path / CONFIG_FILE).is_file() else None


def load_weights(path: str | os.PathLike, name: str) -> dict[str, torch.Tensor] | None:
    """Extra weights saved with ``extra_weights`` (e.g. ``"ema"``), or None."""
    path = _resolve(Path(path))
    if not (path / f"{name}.safetensors").is_file():
        return None
    return _read_weights(path, f"{name}.safetensors", _doc_or_none(path))


def load_train_state(path: str | os.PathLike) -> dict | None:
    """Optimizer/scheduler/epoch/RNG states for resuming, or None if the checkpoint has none.
    ``state["optimizers"]`` and ``state["schedulers"]`` map names to state dicts."""
    path = _resolve(Path(path))
    f = path / STATE_FILE
    if not f.is_file():
        return None
    _verify(path, STATE_FILE, _doc_or_none(path))
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:          # truncated zip, or content weights_only refuses: name the file
        raise CheckpointError(f"{f}: unreadable training state, truncated or damaged ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); resume from another "
                              f"checkpoint or start a new run") from None
    # before optimizers were saved by name there was one, under "optimizer"
    if "optimizers" not in state:
        opt, sched = state.pop("optimizer", None), state.pop("scheduler", None)
        state["optimizers"] = {"model": opt} if opt else {}
        state["schedulers"] = {"model": sched} if sched else {}
    return state


def build_model(ckpt: Checkpoint, weights: str = "model") -> torch.nn.Module:
    """Instantiate the model a checkpoint's config describes and load its weights
    (``weights="ema"`` loads the EMA weights where the checkpoint has them)."""
    from genseg.models import build_segmenter
    from genseg.models.unet import build_diffusion_model

    from genseg.models.dcgan import build_generator
    from genseg.models.vae import build_vae

    builders = {"SegConfig": build_segmenter, "DiffusionConfig": build_diffusion_model, "GANConfig": build_generator,
                "VAEConfig": build_vae}
    name = type(ckpt.config).__name__
    if name not in builders:
        raise CheckpointError(f"no model builder for config type {name}")
    model = builders[name](ckpt.config)
    state = ckpt.state_dict
    if weights != "model":
        state = load_weights(ckpt.path, weights) if ckpt.path is not None else None
        if state is None:
            raise CheckpointError(f"{ckpt.path} has no {weights} weights")
    model.load_state_dict(state)
    return model.eval()


def weights_digest(path: str | os.PathLike) -> str:
    """One SHA-256 over the checkpoint's weight files (``model`` and extras such as ``ema``), from
    the digests its config.json records: two checkpoints with the same weights agree, whatever
    their metadata (e.g. sampling settings stored by tuning)."""
    path = _resolve(Path(path))
    doc = _doc_or_none(path) or {}
    files = doc.get("files") or {}
    names = sorted(n for n in files if n.endswith(".safetensors"))
    h = hashlib.sha256()
    for n in names or [WEIGHTS_FILE]:
        h.update(n.encode())
        h.update((files[n]["sha256"] if n in files else _sha256(path / n)).encode())
    return h.hexdigest()


def copy_with_meta(src: str | os.PathLike, dst: str | os.PathLike, **meta) -> Path:
    """A copy of checkpoint ``src`` at ``dst`` whose ``meta`` has the given keys set (weights and
    their digests unchanged; config.json is not among the digested files)."""
    src, dst = _resolve(Path(src)), Path(dst)
    doc, _ = _read_doc(src)
    doc["meta"] = {**(doc.get("meta") or {}), **meta}
    shutil.copytree(src, dst)
    (dst / CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True, default=_json_default))
    return dst
