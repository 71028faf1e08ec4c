"""Model registries: architectures are picked by name from small dicts."""
from genseg.models.fcn import FCN, build_segmenter  # noqa: F401
