"""The MLflow pyfunc face of a registered genseg model (MLflow "models from code": MLflow runs this
file when a user calls ``mlflow.pyfunc.load_model("models:/genseg-segmenter@champion")``; no pickled
object is stored).  genseg's own commands never import it: they load the checkpoint inside the
model with :func:`genseg.loading.load`, which reads weights only.

* segmenter: ``predict(images (N, H, W, 3) uint8)`` -> label maps ``(N, H, W) uint8``
* diffusion: ``predict(label_maps (N, H, W) int64, params={"seed", "sampler", "steps", "guidance"})``
  -> images ``(N, H, W, 3) uint8`` (an unconditional model takes ``params={"num": N}`` and any input).
* GAN: the same, with ``params={"seed", "truncation"}``.
"""
from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class GensegModel(PythonModel):
    def load_context(self, context):
        from genseg.loading import load

        self.model = load(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        import torch

        params = params or {}
        if isinstance(model_input, dict):      # a named tensor signature hands inputs over by name
            model_input = next(iter(model_input.values()))
        x = np.asarray(model_input)
        if self.model.kind == "segmenter":
            if x.ndim == 3:
                x = x[None]
            if x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(f"expected images of shape (N, H, W, 3), got {x.shape}")
            return self.model.segment_batch(x.astype(np.uint8)).astype(np.uint8)
        keys = ("truncation",) if self.model.kind == "gan" else ("sampler", "steps", "guidance")
        sampling = {k: params.get(k) for k in keys}
        sampling = {k: v for k, v in sampling.items() if v not in (None, "", 0, -1.0)}
        seed = int(params.get("seed") or 0)
        if self.model.conditional:
            labels = torch.from_numpy(x.astype(np.int64))
            if labels.ndim == 2:
                labels = labels[None]
            out = self.model.generate(labels, len(labels), seed, **sampling)
        else:
            out = self.model.generate(None, int(params.get("num") or len(x) or 1), seed, **sampling)
        return out.numpy()


mlflow.models.set_model(GensegModel())
