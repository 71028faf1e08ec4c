"""`genseg prepare` on a real local Ray cluster: every source, and the bad-input contract."""
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from genseg.data.classes import SYNTHETIC
from genseg.data.shards import decode_row
from jobs.cli import main

pytestmark = pytest.mark.integration


def _rows(shards: Path, split: str) -> list[dict]:
    table = pq.read_table(shards / split)
    return sorted(table.to_pylist(), key=lambda r: r["name"])


def _write_pair(img_dir: Path, mask_dir: Path, name: str, mask: np.ndarray, rgb_mask=None, ext=".png"):
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    h, w = mask.shape
    image = np.stack([mask * 20, mask * 10, np.full_like(mask, 99)], -1).astype(np.uint8)
    Image.fromarray(image).save(img_dir / f"{name}{ext}")
    Image.fromarray(rgb_mask if rgb_mask is not None else mask.astype(np.uint8)).save(mask_dir / f"{name}.png")


def test_synthetic_is_seeded_and_complete(ray_cluster, tmp_path):
    for out in ("a", "b"):
        assert main(["prepare", "--source", "synthetic", "--num", "10", "--size", "24x40",
                     "--seed", "3", "--out", str(tmp_path / out), "--workdir", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 8, "val": 2}
    for split, n in (("train", 8), ("val", 2)):      # pixels counted per split, so a split is checkable alone
        assert sum(m["splits"][split]["class_pixels"]) == n * 24 * 40 and m["splits"][split]["ignored_pixels"] == 0
    assert [a + b for a, b in zip(m["splits"]["train"]["class_pixels"], m["splits"]["val"]["class_pixels"])] == \
        m["class_pixels"]
    assert m["num_classes"] == SYNTHETIC.num_classes and m["size"] == [24, 40]
    assert sum(m["class_pixels"]) == 10 * 24 * 40
    for split in ("train", "val"):
        a, b = _rows(tmp_path / "a", split), _rows(tmp_path / "b", split)
        assert [r["image"] for r in a] == [r["image"] for r in b]    # same seed, same bytes
        for r in a:
            img, mask = decode_row(r)
            assert img.shape == (24, 40, 3) and set(np.unique(mask)) <= set(range(SYNTHETIC.num_classes))


def test_camvid_layout_maps_void_to_ignore_and_resizes(ray_cluster, tmp_path):
    root = tmp_path / "camvid"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(3):
            mask = rng.integers(0, 12, (30, 40))
            mask[0, 0] = 11
            _write_pair(root / split, root / f"{split}annot", f"0001TP_{i:06d}", mask)
    out = tmp_path / "shards"
    assert main(["prepare", "--source", "camvid", "--root", str(root), "--out", str(out), "--size", "15x20",
                 "--workdir", str(tmp_path)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_classes"] == 11 and m["classes"]["names"][3] == "road" and m["size"] == [15, 20]
    masks = [decode_row(r)[1] for r in _rows(out, "train")]
    values = set(np.unique(np.stack(masks)).tolist())
    assert 11 not in values and 255 in values and values <= set(range(11)) | {255}
    assert m["ignored_pixels"] > 0


def test_folder_with_rgb_palette_masks(ray_cluster, tmp_path):
    palette = tmp_path / "palette.json"
    palette.write_text(json.dumps({"classes": [{"name": "bg", "color": [0, 0, 255]},
                                               {"name": "fg", "color": [255, 0, 0]}],
                                   "ignore_colors": [[0, 0, 0]]}))
    for i in range(4):
        mask = np.zeros((8, 8), np.int64)
        mask[2:6, 2:6] = 1
        rgb = np.zeros((8, 8, 3), np.uint8)
        rgb[mask == 0] = (0, 0, 255)
        rgb[mask == 1] = (255, 0, 0)
        rgb[0, 0] = (0, 0, 0)
        _write_pair(tmp_path / "img", tmp_path / "msk", f"p{i}", mask, rgb_mask=rgb, ext=".jpg")
    out = tmp_path / "out"
    assert main(["prepare", "--source", "folder", "--images", str(tmp_path / "img"), "--masks",
                 str(tmp_path / "msk"), "--palette", str(palette), "--out", str(out),
                 "--workdir", str(tmp_path)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["classes"]["names"] == ["bg", "fg"] and m["splits"]["train"]["count"] == 3
    mask = decode_row(_rows(out, "train")[0])[1]
    assert mask[0, 0] == 255 and mask[3, 3] == 1 and mask[7, 7] == 0


def _bad_folder(tmp_path: Path) -> tuple[Path, Path]:
    img, msk = tmp_path / "img", tmp_path / "msk"
    good = np.ones((8, 8), np.int64)
    for i in range(4):
        _write_pair(img, msk, f"good{i}", good)
    (img / "broken.png").write_bytes(b"not a png at all")
    _write_pair(img, msk, "broken_mask", good)
    (msk / "broken_mask.png").write_bytes(b"\x89PNG garbage")
    _write_pair(img, msk, "lonely", good)
    (msk / "lonely.png").unlink()
    _write_pair(img, msk, "sizes", good)
    Image.fromarray(np.ones((5, 8), np.uint8)).save(msk / "sizes.png")
    _write_pair(img, msk, "range", np.full((8, 8), 9))
    Image.fromarray(np.ones((8, 8), np.uint8)).save(msk / "broken.png")
    return img, msk


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_bad_inputs_are_all_named_and_nothing_is_damaged(ray_cluster, tmp_path, capsys):
    img, msk = _bad_folder(tmp_path)
    out = tmp_path / "out"
    assert main(["prepare", "--source", "synthetic", "--num", "6", "--size", "16x16", "--out", str(out),
                 "--workdir", str(tmp_path)]) == 0
    earlier = _tree(out)                                   # an earlier good output
    capsys.readouterr()
    code = main(["prepare", "--source", "folder", "--images", str(img), "--masks", str(msk),
                 "--num-classes", "3", "--out", str(out), "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0
    assert "5 bad input file(s)" in err and "Traceback" not in err
    for name in ("broken.png: unreadable image", "broken_mask.png: unreadable mask", "lonely.png: no mask",
                 "sizes.png: mask size 8x5 differs", "range.png: label values [9] out of range 0..2"):
        assert name in err, (name, err)
    assert _tree(out) == earlier                                             # untouched
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]      # no half-written shards

    code = main(["prepare", "--source", "folder", "--images", str(img), "--masks", str(msk),
                 "--num-classes", "3", "--out", str(out), "--skip-bad", "--workdir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0 and "skipped 5 bad pair(s)" in printed and "range.png" in printed
    m = json.loads((out / "manifest.json").read_text())                      # a genseg shard dir is replaced
    assert sum(s["count"] for s in m["splits"].values()) == 4 and len(m["skipped"]) == 5
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name]          # ... as a whole

    mine = tmp_path / "mine"                                  # anything else is never replaced
    mine.mkdir()
    (mine / "precious.txt").write_text("a user's file")
    code = main(["prepare", "--source", "folder", "--images", str(img), "--masks", str(msk), "--num-classes", "3",
                 "--out", str(mine), "--skip-bad", "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0 and f"--out {mine} is a non-empty directory that is not a genseg shard directory" in err
    assert _tree(mine) == {"precious.txt": b"a user's file"}


def test_binary_masks_become_background_and_foreground(ray_cluster, tmp_path, capsys):
    img, msk = tmp_path / "img", tmp_path / "msk"
    for i in range(4):
        mask = np.zeros((8, 8), np.int64)
        mask[2:6, 2:6] = 255                                   # exported by an annotation tool as 0/255
        _write_pair(img, msk, f"p{i}", mask)
    out = tmp_path / "out"
    argv = ["prepare", "--source", "folder", "--images", str(img), "--masks", str(msk), "--out", str(out),
            "--workdir", str(tmp_path)]
    assert main(argv) != 0 and "--binary-masks" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--binary-masks"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["classes"]["names"] == ["background", "foreground"] and m["num_classes"] == 2
    assert m["ignored_pixels"] == 0 and m["class_pixels"] == [4 * 48, 4 * 16]
    assert m["splits"]["val"] == {"count": 1, "class_pixels": [48, 16], "ignored_pixels": 0}
    mask = decode_row(_rows(out, "train")[0])[1]
    assert mask[3, 3] == 1 and mask[0, 0] == 0


def test_missing_root_is_one_clear_line(ray_cluster, tmp_path, capsys):
    code = main(["prepare", "--source", "camvid", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                 "--workdir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0 and "nope does not exist" in err


def test_codecs_hold_the_same_pixels_in_chunked_files_and_keep_source_pngs(ray_cluster, tmp_path):
    root = tmp_path / "camvid"
    rng = np.random.default_rng(2)
    for split, n in (("train", 7), ("val", 2)):
        for i in range(n):
            _write_pair(root / split, root / f"{split}annot", f"0001TP_{i:06d}", rng.integers(0, 11, (30, 40)))
    rows = {}
    for codec in ("png", "raw", "webp"):
        out = tmp_path / codec
        flags = [] if codec == "png" else ["--codec", codec]          # png is the default
        assert main(["prepare", "--source", "camvid", "--root", str(root), "--out", str(out), "--chunk", "3",
                     "--workdir", str(tmp_path), *flags]) == 0
        m = json.loads((out / "manifest.json").read_text())
        assert m["codec"] == codec and m["format"] == "genseg-shards/2"
        # one pass, chunks of 3 pairs, one file per split a chunk touches: train's 7 pairs are 3 files
        assert len(list((out / "train").glob("*.parquet"))) == 3
        rows[codec] = _rows(out, "train")
    for codec in ("raw", "webp"):
        for a, b in zip(rows["png"], rows[codec]):
            assert a["name"] == b["name"]
            assert all(np.array_equal(x, y) for x, y in zip(decode_row(a), decode_row(b)))
    for r in rows["png"]:      # an unchanged source PNG is stored as the file's own bytes: nothing re-encoded
        assert r["image"] == (root / "train" / f"{r['name']}.png").read_bytes()
    assert rows["raw"][0]["image"] == decode_row(rows["png"][0])[0].tobytes()
