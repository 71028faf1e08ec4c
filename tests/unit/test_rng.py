import random

import numpy as np
import pytest
import torch

from genseg import engine, rng

pytestmark = pytest.mark.unit


def test_derived_seeds_never_collide_across_seed_rank_pairs():
    # the old schemes: seed + 1000 * rank and seed + rank give (1000, 0) == (0, 1) and (1, 0) == (0, 1)
    assert 1000 + 1000 * 0 == 0 + 1000 * 1 and 1 + 0 == 0 + 1
    assert rng.derive_seed(1000, 0) != rng.derive_seed(0, 1)
    assert rng.derive_seed(1, 0) != rng.derive_seed(0, 1)
    seeds = {rng.derive_seed(s, r, rng.STREAMS["augment"]) for s in range(200) for r in range(64)}
    assert len(seeds) == 200 * 64
    # streams of one (seed, rank) are distinct too, and everything fits torch/numpy seed ranges
    per_stream = {rng.derive_seed(0, 0, k) for k in rng.STREAMS.values()}
    assert len(per_stream) == len(rng.STREAMS)
    assert all(0 <= s < 2**63 for s in seeds) and 0 <= rng.derive_seed(-5, 3, bits=32) < 2**32


def test_worker_streams_differ_by_rank_and_repeat_by_seed():
    a = [engine.set_seed(7, 0).random() for _ in range(2)]
    b = engine.set_seed(7, 1).random()
    assert a[0] == a[1] and a[0] != b
    engine.set_seed(7, 1)
    t1 = torch.rand(3)
    engine.set_seed(7, 1)
    assert torch.equal(torch.rand(3), t1)


def test_capture_and_restore_continue_every_stream_exactly():
    engine.set_seed(3, 0)
    r, g = random.Random(5), torch.Generator().manual_seed(6)
    for _ in range(3):                      # move every stream off its seed
        random.random(), np.random.rand(), torch.rand(1), r.random(), torch.rand(1, generator=g)
    state = rng.capture({"augment": r, "noise": g})
    expect = (random.random(), np.random.rand(), torch.rand(4), np.random.randn(), r.random(),
              torch.rand(4, generator=g))
    engine.set_seed(99, 3)                  # a fresh process would start elsewhere
    r2, g2 = random.Random(0), torch.Generator().manual_seed(0)
    missing = rng.restore(state, {"augment": r2, "noise": g2, "new": random.Random(1)})
    got = (random.random(), np.random.rand(), torch.rand(4), np.random.randn(), r2.random(),
           torch.rand(4, generator=g2))
    assert got[0] == expect[0] and got[1] == expect[1] and torch.equal(got[2], expect[2])
    assert got[3] == expect[3] and got[4] == expect[4] and torch.equal(got[5], expect[5])
    assert missing == ["new"]
    # only tensors and plain values: what torch.load(weights_only=True) accepts
    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, (int, float, str, torch.Tensor))
    assert plain(state)


def test_epoch_permutation_is_new_each_epoch_and_reproducible():
    p0, p1 = rng.epoch_permutation(50, seed=0, epoch=0), rng.epoch_permutation(50, seed=0, epoch=1)
    assert sorted(p0.tolist()) == list(range(50)) and not np.array_equal(p0, p1)
    assert np.array_equal(p0, rng.epoch_permutation(50, seed=0, epoch=0))
    assert not np.array_equal(p0, rng.epoch_permutation(50, seed=1, epoch=0))


def _blocks(names, block=4, order=None):
    """Ray-Data-like columnar batches of the rows, blocks in the given order."""
    rows = [{"name": n, "height": 1, "width": 1, "image": bytes([i % 256] * 3), "mask": bytes([i % 7])}
            for i, n in enumerate(names)]
    blocks = [rows[i: i + block] for i in range(0, len(rows), block)]
    for b in (blocks if order is None else [blocks[i] for i in order]):
        yield {k: np.array([r[k] for r in b], dtype=object) for k in rows[0]}


def test_epoch_batches_shuffle_across_files_and_ignore_delivery_order():
    # 24 consecutive "video frames" in 6 files of 4; 2 workers, 2 steps of 4 per worker
    names = [f"f{i:03d}" for i in range(24)]
    kw = dict(seed=0, batch_size=4, steps=2)

    def epoch(e, rank, order=None):
        return [b["name"] for b in engine.epoch_batches(_blocks(names, order=order), names, epoch=e, rank=rank,
                                                        world=2, **kw)]

    e0 = epoch(0, 0)
    assert len(e0) == 2 and all(len(b) == 4 for b in e0)
    # the same epoch whatever order Ray delivers the blocks in
    assert e0 == epoch(0, 0, order=[5, 3, 1, 0, 2, 4])
    # a new order every epoch, and batches are not runs of consecutive frames
    assert epoch(1, 0) != e0
    files_in_first_batch = {int(n[1:]) // 4 for n in e0[0]}
    assert len(files_in_first_batch) > 1
    # the two workers get disjoint rows; together 16 of the 24, a different 16 next epoch
    both = [n for b in e0 + epoch(0, 1) for n in b]
    assert len(both) == len(set(both)) == 16
    assert {n for b in epoch(1, 0) + epoch(1, 1) for n in b} != set(both)
    # the rows travel with their names
    first = next(engine.epoch_batches(_blocks(names), names, epoch=0, rank=0, world=2, **kw))
    i = int(first["name"][0][1:])
    assert first["image"][0] == bytes([i] * 3) and first["mask"][0] == bytes([i % 7])


def test_epoch_batches_refuse_missing_rows():
    names = [f"f{i:03d}" for i in range(8)]
    with pytest.raises(RuntimeError, match="not delivered"):
        list(engine.epoch_batches(_blocks(names[:4]), names, seed=0, epoch=0, rank=0, world=1, batch_size=4, steps=2))
