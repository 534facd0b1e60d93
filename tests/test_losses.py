"""seglib/losses.py: each loss against a value worked out by hand on a tiny tensor, its gradient where a class is
missing, the Lovász-Softmax's link to the IoU, and the class weights' formula."""
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from seglib.losses import LOSSES, build_criterion, dice_loss, lovasz_softmax, median_frequency_weights, pixel_shares

# one image of 1x2 pixels, 2 classes: softmax probabilities (0.8, 0.2) and (0.4, 0.6), both pixels of class 0
PROBS = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
LOGITS = PROBS.log().T.reshape(1, 2, 1, 2)  # (B, C, H, W)
TARGET = torch.tensor([[[0, 0]]])  # (B, H, W)


def test_cross_entropy_is_the_books_pixelwise_loss_on_logits():
    logits = torch.tensor([[[[2.0]], [[0.0]]]])  # (1, 2 classes, 1, 1)
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 1))
    assert build_criterion()(logits, torch.tensor([[[0]]])).item() == pytest.approx(expected)


def test_dice_by_hand():
    """Class 0: sum(p y) 1.2, sum(p) 1.2, sum(y) 2 -> 1 - 3.4/4.2; class 1: 0, 0.8, 0 -> 1 - 1/1.8; their mean."""
    expected = ((1 - 3.4 / 4.2) + (1 - 1 / 1.8)) / 2
    assert dice_loss(LOGITS, TARGET).item() == pytest.approx(expected, abs=1e-6)


def test_lovasz_by_hand():
    """Class 0 errors 0.2 and 0.6, sorted 0.6, 0.2: the Jaccard loss steps are 0.5 then 0.5 -> 0.4. Class 1 is
    absent from the labels and left out."""
    assert lovasz_softmax(LOGITS, TARGET).item() == pytest.approx(0.4, abs=1e-6)


def test_lovasz_on_hard_predictions_is_one_minus_the_per_image_iou():
    """The Lovász extension agrees with the Jaccard loss at 0/1 errors: with one-hot probabilities the loss is
    the mean over images of the mean 1 - IoU over each image's classes (the book's per-image mIoU)."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (3, 8, 10), generator=gen)
    target[2] = 0  # an all-background image
    pred = torch.randint(0, 4, (3, 8, 10), generator=gen)
    logits = 60 * F.one_hot(pred, 4).permute(0, 3, 1, 2).float()
    per_image = []
    for t, p in zip(target, pred):
        ious = [((t == c) & (p == c)).sum() / ((t == c) | (p == c)).sum() for c in range(4) if (t == c).any()]
        per_image.append(1 - torch.stack(ious).mean())
    assert lovasz_softmax(logits, target).item() == pytest.approx(torch.stack(per_image).mean().item(), abs=1e-5)


def _lovasz_reference(probs, labels):
    """Berman et al.'s lovasz_softmax(probas, labels, classes="present", per_image=True), written out one image
    and one class at a time as their reference code does: errors |fg - p| sorted in decreasing order, dotted
    with the gradient of the Lovász extension of the Jaccard loss at that order."""
    losses = []
    for prob, label in zip(probs, labels):  # (C, H, W), (H, W)
        prob, label = prob.reshape(prob.shape[0], -1).t(), label.reshape(-1)  # (P, C), (P,)
        per_class = []
        for c in range(prob.shape[1]):
            fg = (label == c).to(prob.dtype)
            if fg.sum() == 0:  # classes="present": only the classes of the labels
                continue
            errors, perm = torch.sort((fg - prob[:, c]).abs(), descending=True)
            fg_sorted = fg[perm]
            gts = fg_sorted.sum()
            jaccard = 1.0 - (gts - fg_sorted.cumsum(0)) / (gts + (1 - fg_sorted).cumsum(0))
            grad = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
            per_class.append(torch.dot(errors, grad))
        losses.append(torch.stack(per_class).mean())
    return torch.stack(losses).mean()


def test_lovasz_matches_the_reference_on_soft_predictions_over_several_images():
    """Value and gradient on soft (softmax) predictions of 4 images, one of them all background and one without
    class 2, against the one-image-one-class re-derivation above."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 4, 9, 11, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 4, (4, 9, 11), generator=gen)
    target[1] = 0
    target[2][target[2] == 2] = 3
    ours = logits.clone().float().requires_grad_()
    theirs = logits.clone().requires_grad_()
    value, reference = lovasz_softmax(ours, target), _lovasz_reference(theirs.softmax(1), target)
    value.backward()
    reference.backward()
    assert value.item() == pytest.approx(reference.item(), abs=1e-6)
    assert 0.1 < reference.item() < 1  # soft predictions: neither perfect nor the hard-prediction value
    torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", ["all background", "class absent"])
def test_gradients_are_finite_where_classes_are_missing(loss, case):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, 7, generator=gen, requires_grad=True)
    target = torch.zeros(2, 6, 7, dtype=torch.long)
    if case == "class absent":  # classes 0, 1 and 3; none of 2
        target[:, 2:4] = 1
        target[1, :, 5:] = 3
    value = build_criterion(loss, torch.tensor([0.5, 1.0, 2.0, 1.5]), 0.7)(logits, target)
    value.backward()
    assert torch.isfinite(value) and value > 0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_sum_is_cross_entropy_plus_the_weighted_term():
    weights = torch.tensor([1.0, 3.0])
    ce = F.cross_entropy(LOGITS, TARGET, weight=weights)
    assert build_criterion("ce+lovasz", weights, 0.5)(LOGITS, TARGET).item() == pytest.approx(ce.item() + 0.2)
    assert build_criterion("ce+dice", None, 2.0)(LOGITS, TARGET).item() == pytest.approx(
        F.cross_entropy(LOGITS, TARGET).item() + 2 * dice_loss(LOGITS, TARGET).item())


def test_class_weights_weigh_the_cross_entropy():
    """With weights (1, 3) a pixel of class 1 counts three times one of class 0 in the weighted mean."""
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    nll = -logits.log_softmax(1)[0, :, 0]  # (C, W)
    expected = (1 * nll[0, 0] + 3 * nll[1, 1]) / 4
    assert build_criterion("ce", torch.tensor([1.0, 3.0]))(logits, target).item() == pytest.approx(expected.item())


def test_median_frequency_weights():
    masks = [np.array([[0, 0, 0, 0], [0, 0, 1, 2]], dtype=np.uint8), np.zeros((2, 4), dtype=np.uint8)]
    shares = pixel_shares(masks, 4)  # 14, 1, 1, 0 of 16 pixels
    np.testing.assert_allclose(shares, [14 / 16, 1 / 16, 1 / 16, 0])
    # median of the classes present (14, 1, 1)/16 is 1/16; the absent class gets 0
    np.testing.assert_allclose(median_frequency_weights(shares).numpy(), [1 / 14, 1, 1, 0], rtol=1e-6)


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="loss must be one of"):
        build_criterion("focal")
