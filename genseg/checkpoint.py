"""The one checkpoint format, used by training resume, evaluation and serving.

A checkpoint is a directory:

    config.json        {"type": "SegConfig", "fields": {...}, "meta": {epoch, metrics, classes}}
    model.safetensors  model weights (tensors only, no pickled code)
    train_state.pt     optimizer / scheduler / epoch, for resuming; read with weights_only=True

Nothing here executes code from the file: weights go through safetensors and the training
state through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from genseg import config as config_lib
from genseg.errors import InputError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"


class CheckpointError(InputError):
    """A directory is not a readable genseg checkpoint."""


@dataclass
class Checkpoint:
    config: Any                       # the job's frozen config dataclass
    state_dict: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def epoch(self) -> int:
        return int(self.meta.get("epoch", -1))


def save(path: str | os.PathLike, model: torch.nn.Module, cfg: Any, *, epoch: int,
         metrics: dict | None = None, classes: dict | None = None,
         optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
         extra_meta: dict | None = None, extra_state: dict | None = None,
         extra_weights: dict[str, torch.nn.Module] | None = None) -> Path:
    """Write a checkpoint directory atomically (a temp dir renamed into place).

    ``extra_weights`` saves more modules as ``<name>.safetensors`` (e.g. ``{"ema": ema_model}``);
    ``extra_state`` adds tensors/numbers to the resume state."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        module = getattr(model, "module", model)          # unwrap DDP
        state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        for name, extra in (extra_weights or {}).items():
            save_file({k: v.detach().to("cpu").contiguous() for k, v in extra.state_dict().items()},
                      str(tmp / f"{name}.safetensors"))
        meta = {"epoch": epoch, "metrics": metrics or {}, "classes": classes, **(extra_meta or {})}
        doc = json.loads(config_lib.to_json(cfg))
        doc["meta"] = meta
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True, default=_json_default))
        if optimizer is not None:
            torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        **(extra_state or {})}, tmp / STATE_FILE)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _json_default(o):
    if isinstance(o, float):
        return o
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load(path: str | os.PathLike) -> Checkpoint:
    """Read config and weights of a checkpoint directory."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{path} is not a genseg checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        doc = json.loads((path / CONFIG_FILE).read_text())
        cfg = config_lib.from_json(json.dumps({"type": doc["type"], "fields": doc["fields"]}))
    except (KeyError, json.JSONDecodeError, config_lib.ConfigError) as exc:
        raise CheckpointError(f"{path / CONFIG_FILE}: unreadable checkpoint config ({exc})") from None
    return Checkpoint(cfg, load_file(str(path / WEIGHTS_FILE)), doc.get("meta", {}), path)


def load_weights(path: str | os.PathLike, name: str) -> dict[str, torch.Tensor] | None:
    """Extra weights saved with ``extra_weights`` (e.g. ``"ema"``), or None."""
    f = Path(path) / f"{name}.safetensors"
    return load_file(str(f)) if f.is_file() else None


def load_train_state(path: str | os.PathLike) -> dict | None:
    """Optimizer/scheduler/epoch for resuming, or None if the checkpoint has none."""
    f = Path(path) / STATE_FILE
    if not f.is_file():
        return None
    return torch.load(f, map_location="cpu", weights_only=True)


def build_model(ckpt: Checkpoint, weights: str = "model") -> torch.nn.Module:
    """Instantiate the model a checkpoint's config describes and load its weights
    (``weights="ema"`` loads the EMA weights where the checkpoint has them)."""
    from genseg.models import build_segmenter
    from genseg.models.unet import build_diffusion_model

    builders = {"SegConfig": build_segmenter, "DiffusionConfig": build_diffusion_model}
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
