import math

import pytest
import torch

from genseg.metrics import ConfusionMatrix

pytestmark = pytest.mark.unit


def test_hand_computed_matrix_and_scores():
    # 4 classes; class 3 appears in neither labels nor predictions; 255 is ignored
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 0]])
    cm = ConfusionMatrix(4, ignore_index=255)
    cm.update(pred, target)
    expected = torch.tensor([[2, 1, 0, 0],
                             [0, 2, 0, 0],
                             [1, 0, 1, 0],
                             [0, 0, 0, 0]])
    assert torch.equal(cm.mat, expected)   # the ignored pixel (pred 3) is not counted
    r = cm.compute()
    assert r["pixel_acc"] == pytest.approx(5 / 7)
    # IoU: c0 = 2/(3+3-2)=0.5, c1 = 2/(2+3-2)=2/3, c2 = 1/(2+1-1)=0.5, c3 undefined
    assert r["iou"][:3] == pytest.approx([0.5, 2 / 3, 0.5])
    assert math.isnan(r["iou"][3])
    assert r["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    # class accuracy: 2/3, 2/2, 1/2 -> mean over the three present classes
    assert r["mean_acc"] == pytest.approx((2 / 3 + 1 + 0.5) / 3)


def test_class_predicted_but_absent_from_labels_scores_zero():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 2, 2]), torch.tensor([0, 0, 1]))
    r = cm.compute()
    assert r["iou"] == pytest.approx([0.5, 0.0, 0.0])   # class 2 has a false positive: IoU 0, not NaN
    assert math.isnan(r["class_acc"][2])
    assert r["miou"] == pytest.approx(0.5 / 3)


def test_accumulates_and_resets():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    cm.update(torch.tensor([1]), torch.tensor([0]))
    assert cm.mat.tolist() == [[1, 1], [0, 1]]
    cm.reduce()   # no process group: a no-op
    assert cm.mat.tolist() == [[1, 1], [0, 1]]
    cm.reset()
    assert cm.mat.sum() == 0
    assert math.isnan(cm.compute()["miou"])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(2).update(torch.zeros(2, 2), torch.zeros(2, 3))
