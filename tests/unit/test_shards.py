"""Shard codecs, the chunk writer behind `genseg prepare`, and reading older shard directories:
no Ray needed (the writer is plain Python; Ray Data only fans it out)."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from genseg.data.shards import CODECS, DecodeError, decode_row, encode_row, fingerprint
from genseg.data.synthetic import make_scene
from pipelines.prepare import Tally, _manifest, work_items, write_chunk
from pipelines.shards import ShardError, check_split, iter_split, load_manifest
from pipelines.sources import synthetic

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_gives_back_the_exact_pixels(codec):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)        # noise: no codec can cheat on it
    mask = rng.integers(0, 12, (23, 31)).astype(np.uint8)
    mask[0, :5] = 255
    row = encode_row("a", image, mask, codec)
    assert row["codec"] == codec
    i2, m2 = decode_row(row)
    assert np.array_equal(i2, image) and np.array_equal(m2, mask)
    if codec != "raw":          # compressed: the mask of a real scene is far below its raw size
        _, scene_mask = make_scene(0, 0, 90, 120)
        assert len(encode_row("s", *make_scene(0, 0, 90, 120), codec)["mask"]) < scene_mask.nbytes / 4


def test_a_row_without_a_codec_column_is_raw_and_unknown_codecs_are_refused():
    image, mask = make_scene(0, 1, 8, 10)
    row = encode_row("a", image, mask, "raw")
    del row["codec"]                              # how genseg-shards/1 rows look
    assert np.array_equal(decode_row(row)[0], image)
    with pytest.raises(ValueError, match="unknown shard codec 'gif'"):
        encode_row("a", image, mask, "gif")


def test_damaged_cell_is_one_error_naming_the_row():
    image, mask = make_scene(0, 1, 16, 20)
    row = encode_row("street_7", image, mask, "png")
    with pytest.raises(DecodeError, match="row 'street_7': its image bytes do not decode"):
        decode_row({**row, "image": row["image"][:40]})
    with pytest.raises(DecodeError, match=r"row 'street_7': its mask decodes to \(16, 20, 3\)"):
        decode_row({**row, "mask": row["image"]})       # an RGB picture where a mask belongs


def _items(n, size=(20, 24)):
    return work_items(synthetic(n, size, seed=5, val_fraction=0.3))


@pytest.mark.parametrize("codec", ["png", "raw"])
def test_write_chunk_writes_one_file_per_split_named_by_its_first_item(tmp_path, codec):
    items = _items(10)
    stats = write_chunk(items[3:7], tmp_path, None, None, codec)
    splits = [it["split"] for it in items[3:7]]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.parquet")) == \
        sorted({f"{s}/part-0000003.parquet" for s in splits})
    rows = [r for s in set(splits) for r in pq.read_table(tmp_path / s).to_pylist()]
    assert sorted(r["name"] for r in rows) == sorted(it["name"] for it in items[3:7])
    for r in rows:
        index = int(r["name"].split("_")[1])
        want_image, want_mask = make_scene(5, index, 20, 24)
        got_image, got_mask = decode_row(r)
        assert np.array_equal(got_image, want_image) and np.array_equal(got_mask, want_mask)
    for s in stats:                 # the numbers the manifest is added up from, one record per item
        _, m = make_scene(5, int(s["name"].split("_")[1]), 20, 24)
        assert s["error"] == "" and (s["height"], s["width"]) == (20, 24)
        assert np.array_equal(np.frombuffer(s["hist"], np.int64), np.bincount(m.ravel(), minlength=256))


def test_a_bad_item_is_reported_and_left_out_while_the_rest_is_written(tmp_path):
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "in" / "ok.png")
    Image.fromarray(np.ones((6, 8), np.uint8)).save(tmp_path / "in" / "ok_m.png")
    (tmp_path / "in" / "bad.png").write_bytes(b"not a png")
    items = [{"kind": "files", "split": "train", "name": n, "image_path": str(tmp_path / "in" / f"{n}.png"),
              "mask_path": str(tmp_path / "in" / "ok_m.png"), "label_map": "", "order": i}
             for i, n in enumerate(["ok", "bad"])]
    stats = write_chunk(items, tmp_path / "out", None, 3, "png")
    assert stats[0]["error"] == "" and "bad.png: unreadable image" in stats[1]["error"]
    assert [r["name"] for r in pq.read_table(tmp_path / "out" / "train").to_pylist()] == ["ok"]


def test_manifest_adds_up_the_stats_and_refuses_problems_unless_skipping(tmp_path):
    src = synthetic(6, (12, 16), seed=0, val_fraction=0.34)
    tally = Tally()
    stats = write_chunk(work_items(src), tmp_path, None, None, "png")
    stats[0] = {**stats[0], "error": "x.png: unreadable image"}
    tally.add({k: [s[k] for s in stats] for k in stats[0]})
    with pytest.raises(Exception, match="1 bad input file"):
        _manifest(src, tally, False, {}, "png")
    m = _manifest(src, tally, True, {}, "png")
    assert m["skipped"] == ["x.png: unreadable image"] and m["codec"] == "png" and m["format"] == "genseg-shards/2"
    assert sum(v["count"] for v in m["splits"].values()) == 5
    assert sum(m["class_pixels"]) == 5 * 12 * 16


def _old_shard_dir(root, fmt="genseg-shards/1"):
    """A shard directory as genseg wrote it before codecs: raw arrays, no codec column."""
    rows = {"train": [], "val": []}
    for i in range(4):
        image, mask = make_scene(0, i, 10, 12)
        row = encode_row(f"s{i}", image, mask, "raw")
        del row["codec"]
        rows["train" if i < 3 else "val"].append(row)
    for split, rs in rows.items():
        (root / split).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rs), root / split / "part-0.parquet")
    (root / "manifest.json").write_text(json.dumps({
        "format": fmt, "classes": {"names": ["a"] * 8}, "num_classes": 8, "ignore_index": 255,
        "splits": {"train": {"count": 3}, "val": {"count": 1}}, "sizes": [[10, 12]]}))
    return root


def test_shards_written_before_codecs_still_load(tmp_path):
    d = _old_shard_dir(tmp_path / "old")
    assert check_split(d, "train")["format"] == "genseg-shards/1"
    batch = next(iter_split(d, "train", batch_size=8))
    assert "codec" not in batch
    image, mask = decode_row({k: v[0] for k, v in batch.items()})
    assert np.array_equal(image, make_scene(0, 0, 10, 12)[0])


def test_a_newer_shard_format_says_to_upgrade(tmp_path):
    d = _old_shard_dir(tmp_path / "new", fmt="genseg-shards/9")
    with pytest.raises(ShardError, match="'genseg-shards/9' is newer than this genseg reads"):
        load_manifest(d)


def test_fingerprint_is_the_same_for_the_same_pixels_in_any_codec(tmp_path):
    src = synthetic(6, (12, 16), seed=0, val_fraction=0.34)
    prints = []
    for codec in ("raw", "png", "webp"):
        d = tmp_path / codec
        stats = write_chunk(work_items(src), d, None, None, codec)
        tally = Tally()
        tally.add({k: [s[k] for s in stats] for k in stats[0]})
        m = _manifest(src, tally, False, {}, codec)
        (d / "manifest.json").write_text(json.dumps(m))
        prints.append(fingerprint(d, "val")[0])
    assert prints[0] == prints[1] == prints[2]
    # and a single changed pixel is a different data set
    d = tmp_path / "png"
    f = next((d / "val").glob("*.parquet"))
    rows = pq.read_table(f).to_pylist()
    image, mask = decode_row(rows[0])
    image = image.copy()
    image[0, 0, 0] ^= 1
    rows[0] = encode_row(rows[0]["name"], image, mask, "png")
    pq.write_table(pa.Table.from_pylist(rows), f)
    assert fingerprint(d, "val")[0] != prints[0]
