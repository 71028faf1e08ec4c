"""The model deployments: thin Ray Serve wrappers; the model code stays in genseg/.

* :class:`SegmenterDeployment` - segmentation: ``segment_many`` takes a batch the ingress gathered
  (one actor call per batch, not per request); ``segment`` batches single-image calls (the Editor's)
  with ``@serve.batch``.
* :class:`GeneratorDeployment` - generation and inpainting (a diffusion model or a GAN, whichever
  REF it is given: both implement ``genseg.generation.Generator``).
* :class:`EditorDeployment` - object removal and background replacement, composed from the two
  through their deployment handles (segment -> select region -> inpaint -> paste).

Each loads its model in ``__init__`` through ``genseg.tracking.resolve`` + ``genseg.loading.load``
(a :class:`serve_app.slot.ModelSlot`), sets its torch threads, and answers ``check_health`` by
running its model.  ``reconfigure(user_config)`` switches models without dropping requests:
``{"model": REF, "poll_interval_s": S}`` (and ``max_batch_size`` for the segmenter).  Every result
comes back with the identity of the model that made it (the response header).
"""
from __future__ import annotations

import asyncio
import logging

import numpy as np
import torch
from ray import serve

from genseg import editing
from genseg.editing import EditOptions
from serve_app.slot import ModelSlot, header_value

log = logging.getLogger("ray.serve")


def _device() -> str:
    """The GPU Ray gave this replica (``ray_actor_options: {num_gpus: 1}``), else the CPU."""
    import ray

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


class _Served:
    """What both model deployments share: the slot, reconfigure and describe."""

    slot: ModelSlot

    def _reconfigure(self, cfg: dict) -> None:
        ref = cfg.get("model")
        if ref and ref != self.slot.ref:
            self.slot.swap(ref, "reconfigured (user_config)")
        if "poll_interval_s" in cfg:
            self.slot.watch(float(cfg["poll_interval_s"]))

    def describe(self) -> dict:
        return self.slot.describe()

    def __del__(self):
        slot = getattr(self, "slot", None)
        if slot is not None:
            slot.close()


@serve.deployment(name="Segmenter", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=16,
                  health_check_period_s=30, health_check_timeout_s=30,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                      "upscale_delay_s": 5, "downscale_delay_s": 30})
class SegmenterDeployment(_Served):
    def __init__(self, ref: str, tracking_uri: str, threads: int = 1, poll_interval_s: float = 30.0,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01):
        self.slot = ModelSlot(ref, tracking_uri, "segmenter", threads, _device())
        self.slot.watch(poll_interval_s)
        self.segment_batch.set_max_batch_size(max_batch_size)
        self.segment_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def reconfigure(self, cfg: dict) -> None:
        self._reconfigure(cfg)
        if "max_batch_size" in cfg:
            self.segment_batch.set_max_batch_size(int(cfg["max_batch_size"]))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def segment_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, str]]:
        # the forward pass runs off the event loop, so health checks and queueing go on meanwhile
        return await asyncio.to_thread(self._segment_many, images)

    def _segment_many(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, str]]:
        """Images ``(H, W, 3) uint8`` -> (class ids ``(H, W)``, model); images of one size share a forward pass."""
        model = self.slot.model          # one model for the whole batch, even if a swap lands meanwhile
        tag = header_value(model)
        out: list = [None] * len(images)
        by_size: dict[tuple, list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(im.shape, []).append(i)
        for idx in by_size.values():
            labels = model.segment_batch(np.stack([images[i] for i in idx]))
            for i, lab in zip(idx, labels):
                out[i] = (lab, tag)
        return out

    async def segment(self, image: np.ndarray) -> tuple[np.ndarray, str]:
        return await self.segment_batch(image)

    async def segment_many(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, str]]:
        """A batch gathered by the caller (the ingress): one call, one forward pass per image size."""
        return await asyncio.to_thread(self._segment_many, images)

    def check_health(self) -> None:
        labels = self.slot.model.segment_batch(np.zeros((1, 32, 32, 3), np.uint8))
        if labels.shape != (1, 32, 32):
            raise RuntimeError(f"the segmenter returned shape {labels.shape} for a 32x32 image")


@serve.deployment(name="Generator", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=4,
                  health_check_period_s=30, health_check_timeout_s=60,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                      "upscale_delay_s": 5, "downscale_delay_s": 60})
class GeneratorDeployment(_Served):
    def __init__(self, ref: str, tracking_uri: str, threads: int = 1, poll_interval_s: float = 30.0):
        self.slot = ModelSlot(ref, tracking_uri, "generator", threads, _device())
        self.slot.watch(poll_interval_s)

    def reconfigure(self, cfg: dict) -> None:
        self._reconfigure(cfg)

    def generate(self, labels: np.ndarray | None, seed: int, sampling: dict) -> tuple[np.ndarray, str, dict]:
        """One image ``(H, W, 3) uint8`` from label map ``(h, w)`` (or None) -> (image, model, settings used)."""
        model = self.slot.model
        settings = model.settings(**sampling)
        cond = None if labels is None else torch.from_numpy(labels)[None]
        out = model.generate(cond, 1, seed, **settings.to_dict())
        return out[0].numpy(), header_value(model), settings.to_dict()

    def inpaint(self, image: torch.Tensor, hole: torch.Tensor, labels: torch.Tensor | None, seed: int,
                resample: int, sampling: dict) -> tuple[torch.Tensor, str, dict]:
        model = self.slot.model
        settings = model.settings(**sampling)
        out = model.inpaint(image, hole, labels, seed, resample=resample, **settings.to_dict())
        return out, header_value(model), settings.to_dict()

    def image_size(self) -> tuple[int, int]:
        return tuple(self.slot.model.image_size)

    def check_health(self) -> None:
        m = self.slot.model
        cond = torch.zeros(1, *m.image_size, dtype=torch.long) if m.conditional else None
        fast = {"steps": 1, "sampler": "ddim"} if m.kind == "diffusion" else {}
        out = m.generate(cond, 1, 0, **fast)
        if tuple(out.shape) != (1, *m.image_size, 3):
            raise RuntimeError(f"the generator returned shape {tuple(out.shape)}")


@serve.deployment(name="Editor", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=8,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2})
class EditorDeployment:
    """Segment (through the Segmenter's handle), choose the region, inpaint it (through the
    Generator's handle) at the model's size, paste it back at the image's size."""

    def __init__(self, segmenter, generator):
        self.segmenter = segmenter
        self.generator = generator

    async def edit(self, image: np.ndarray, operation: str, classes: list[int], label_map: np.ndarray | None,
                   conditional: bool, opts: EditOptions, sampling: dict) -> dict:
        labels, seg_tag = await self.segmenter.segment.remote(image)
        if operation == "remove":
            region, cond = editing.removal_region(labels, classes, opts, conditional)
        else:
            region, cond = editing.background_region(labels, classes, label_map, conditional)
        result = {"segmenter": seg_tag, "edited_pixels": int(region.sum()), "generator": None, "sampling": None}
        if not region.any():
            result["image"] = image
            return result
        size = await self.generator.image_size.remote()
        x, hole, lab = editing.model_inputs(image, region, cond, size)
        out, gen_tag, used = await self.generator.inpaint.remote(x, hole, lab, opts.seed, opts.resample, sampling)
        result.update(image=editing.paste(image, out, region, opts.feather), generator=gen_tag, sampling=used)
        return result
