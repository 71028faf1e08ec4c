"""What the Serve application is told: which models, where the registry is, and the limits that
keep a replica healthy.  Plain Python (no Ray): ``genseg serve`` flags, ``serve_app/config.yaml``
``args`` and tests all build an :class:`AppOptions` and get the same checks.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from genseg.errors import InputError

DEFAULT_SEGMENTER = "models:/genseg-segmenter@champion"
DEFAULT_GENERATOR = "models:/genseg-diffusion@champion"


class OptionsError(InputError):
    """An app option that is unknown or out of range (names the option)."""


@dataclass(frozen=True)
class AppOptions:
    segmenter: str = DEFAULT_SEGMENTER       # model REFs (a models:/ alias is followed as it moves)
    generator: str = DEFAULT_GENERATOR       # a diffusion or a GAN model
    tracking_uri: str = ""                   # "" = $MLFLOW_TRACKING_URI or sqlite:///<workdir>/mlflow.db
    workdir: str = ""                        # "" = $GENSEG_WORKDIR or ./genseg-runs
    poll_interval_s: float = 30.0            # how often replicas look for a moved champion alias (0 = never)
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 2048 * 2048            # per uploaded image or label map
    max_steps: int = 250                     # sampler steps a request may ask for
    max_guidance: float = 50.0
    segment_timeout_s: float = 30.0          # a request still running after this gets a 504
    generate_timeout_s: float = 300.0        # synthesize and edit
    max_batch_size: int = 8                  # /v1/segment requests batched per hop and forward pass (1 = off)
    batch_wait_timeout_s: float = 0.005     # how long a lone request waits for company
    threads: int = 1                         # torch threads per model replica

    def __post_init__(self):
        for name in ("max_upload_bytes", "max_pixels", "max_steps", "max_batch_size", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise OptionsError(f"serve option {name} must be a whole number >= 1, got {v!r}")
        for name in ("poll_interval_s", "max_guidance", "segment_timeout_s", "generate_timeout_s",
                     "batch_wait_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise OptionsError(f"serve option {name} must be a finite number >= 0, got {v!r}")
        for name in ("segment_timeout_s", "generate_timeout_s"):
            if getattr(self, name) <= 0:
                raise OptionsError(f"serve option {name} must be > 0 seconds")
        for name in ("segmenter", "generator"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise OptionsError(f"serve option {name} must be a model REF (a checkpoint directory, run id "
                                   f"or models:/ URI)")

    @classmethod
    def from_dict(cls, args: dict | None) -> "AppOptions":
        """From ``serve_app/config.yaml``'s ``args`` (or ``serve run ... key=value``): unknown keys are
        refused by name; numbers given as strings are converted."""
        args = dict(args or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise OptionsError(f"unknown serve option(s) {', '.join(unknown)}; known: {', '.join(known)}")
        out = {}
        for k, v in args.items():
            default = known[k].default
            if isinstance(v, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
                try:
                    v = int(v) if isinstance(default, int) else float(v)
                except ValueError:
                    raise OptionsError(f"serve option {k}={v!r} is not a number") from None
            out[k] = v
        return cls(**out)

    def resolved(self) -> "AppOptions":
        """With the workdir made absolute and the tracking URI filled in, as replicas need them
        (they may start in another directory, or on another node that reads the same store)."""
        from genseg.tracking import default_tracking_uri

        wd = Path(self.workdir or os.environ.get("GENSEG_WORKDIR") or "genseg-runs").resolve()
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(wd)
        return type(self)(**{**asdict(self), "workdir": str(wd), "tracking_uri": uri})

    def to_dict(self) -> dict:
        return asdict(self)
