from genseg.metrics.segmentation import ConfusionMatrix  # noqa: F401
