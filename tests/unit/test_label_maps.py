"""Reading label maps from shards for sampling: order, resize and reuse when there are fewer maps."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from genseg.config import DiffusionConfig
from genseg.data.shards import encode_row
from jobs.sample_job import label_maps

pytestmark = pytest.mark.unit


def test_label_maps_keep_order_resize_nearest_and_cycle(tmp_path):
    rows = []
    for i in range(2):
        mask = np.full((8, 12), i + 1, np.uint8)
        mask[0, 0] = 255
        rows.append(encode_row(f"m{i}", np.zeros((8, 12, 3), np.uint8), mask))
    (tmp_path / "val").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "val" / "part.parquet")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "genseg-shards/1", "num_classes": 3,
                                                                "splits": {"val": {"count": 2}}}))
    cfg = DiffusionConfig(num_classes=3, channels=(8, 16), image_size=(4, 6))
    maps = label_maps(str(tmp_path), "val", 5, cfg)
    assert maps.shape == (5, 4, 6) and maps.dtype == torch.int64
    assert [int(m[1, 1]) for m in maps] == [1, 2, 1, 2, 1]          # reused in order
    assert set(maps.unique().tolist()) <= {1, 2, 255}                 # NEAREST: no invented labels
    with pytest.raises(ValueError, match="model expects 4"):
        label_maps(str(tmp_path), "val", 1, DiffusionConfig(num_classes=4, channels=(8, 16), image_size=(4, 6)))
