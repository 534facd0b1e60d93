"""seglib/inference.py: both mIoU definitions against hand-computed examples, and the confusion matrix."""
import pytest
import torch

from seglib import inference
from seglib.inference import SegmentationMetrics


def test_metrics_by_hand_with_absent_classes():
    # image 1: ground truth has classes 0 and 1 only; the prediction invents a 2
    gt1 = torch.tensor([[0, 0, 1], [0, 1, 1]])
    pr1 = torch.tensor([[0, 2, 1], [0, 1, 0]])
    # image 2: ground truth has classes 0 and 3; class 1 and 2 absent everywhere in it
    gt2 = torch.tensor([[3, 3, 0], [0, 0, 0]])
    pr2 = torch.tensor([[3, 0, 0], [0, 0, 0]])
    m = SegmentationMetrics(4)
    m.update(pr1, gt1)
    m.update(pr2, gt2)
    r = m.compute(["bg", "a", "b", "c"])
    # image 1: class 0: tp 2, union 4 -> 0.5; class 1: tp 2, union 3 -> 2/3 (class 2 is not in the ground truth)
    # image 2: class 0: tp 4, union 5 -> 0.8; class 3: tp 1, union 2 -> 0.5
    assert r["miou_per_image"] == pytest.approx(((0.5 + 2 / 3) / 2 + (0.8 + 0.5) / 2) / 2)
    assert r["pixel_accuracy_per_image"] == pytest.approx((4 / 6 + 5 / 6) / 2)
    # dataset: class 0: tp 6, gt 7, pred 8 -> 6/9; class 1: 2/3; class 2: tp 0, union 1 -> 0; class 3: 1/2
    assert [c["iou"] for c in r["per_class"]] == pytest.approx([6 / 9, 2 / 3, 0.0, 0.5])
    assert r["miou"] == pytest.approx((6 / 9 + 2 / 3 + 0 + 0.5) / 4)
    assert r["pixel_accuracy"] == pytest.approx(9 / 12)
    # class accuracy over classes in the ground truth: 6/7, 2/3, 1/2 (class 2 has none: None in JSON)
    assert r["mean_class_accuracy"] == pytest.approx((6 / 7 + 2 / 3 + 0.5) / 3)
    assert r["per_class"][2]["accuracy"] is None
    assert r["n_images"] == 2
    assert [c["share"] for c in r["per_class"]] == pytest.approx([7 / 12, 3 / 12, 0, 2 / 12])


def test_class_absent_from_ground_truth_and_prediction_is_left_out_of_miou():
    m = SegmentationMetrics(4)
    m.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    r = m.compute()
    assert r["miou"] == 1.0 and r["miou_per_image"] == 1.0 and r["per_class"][3]["iou"] is None


def test_confusion_matrix_counts_every_pixel_pair():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randint(0, 4, (37, 41), generator=g), torch.randint(0, 4, (37, 41), generator=g)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
        expected[t, p] += 1
    got = inference.confusion_matrix(pred.to(torch.uint8), target.to(torch.uint8), 4)
    assert got.dtype == torch.int64 and torch.equal(got, expected)


