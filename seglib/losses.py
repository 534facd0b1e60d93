"""Training losses on (B, C, H, W) logits and (B, H, W) class maps: the book's cross-entropy (optionally
class-weighted), soft Dice, Lovász-Softmax, and the sum of cross-entropy with either; class weights from the
training split's pixel shares."""
import numpy as np
import torch
from torch.nn import functional as F

from seglib.files import UsageError

LOSSES = ("ce", "dice", "lovasz", "ce+dice", "ce+lovasz")


def dice_loss(logits, target, smooth=1.0):
    """Soft Dice loss: the mean over classes of ``1 - (2 sum(p y) + s) / (sum(p) + sum(y) + s)`` over every pixel
    of the batch (p: softmax probabilities, y: one-hot labels, s: ``smooth``, which keeps a class absent from
    both at zero loss and its gradient finite)."""
    probs = logits.float().softmax(1)  # (B, C, H, W)
    onehot = F.one_hot(target.long(), probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)  # (B, C, H, W)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)  # (C,)
    total = probs.sum(dims) + onehot.sum(dims)
    return (1 - (2 * inter + smooth) / (total + smooth)).mean()


def _lovasz_grad(fg_sorted):
    """Gradient of the Lovász extension of the Jaccard loss at errors sorted in decreasing order: (B, P, C)
    foreground indicators in that order -> (B, P, C) weights (Berman et al., CVPR 2018, Alg. 1)."""
    gts = fg_sorted.sum(1, keepdim=True)  # (B, 1, C)
    intersection = gts - fg_sorted.cumsum(1)
    union = gts + (1 - fg_sorted).cumsum(1)
    jaccard = 1 - intersection / union.clamp_min(1)  # union >= 1 wherever the class is present
    return torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)


def lovasz_softmax(logits, target):
    """Lovász-Softmax loss per image (Berman et al., CVPR 2018): for each image, the mean over the classes present
    in its labels of the Lovász extension of that class's Jaccard loss, at the errors ``|y - p|``; then the mean
    over images. On one-hot predictions it equals the mean of ``1 - IoU`` over the present classes."""
    probs = logits.float().softmax(1).flatten(2).transpose(1, 2)  # (B, P, C)
    fg = F.one_hot(target.long().flatten(1), probs.shape[2]).to(probs.dtype)  # (B, P, C)
    errors, order = (fg - probs).abs().sort(dim=1, descending=True)  # each class's pixels, worst first
    per_class = (errors * _lovasz_grad(fg.gather(1, order))).sum(1)  # (B, C)
    present = (fg.sum(1) > 0).to(per_class.dtype)  # (B, C); an image always has one class at least
    return ((per_class * present).sum(1) / present.sum(1)).mean()


class Criterion:
    """``loss`` (one of LOSSES) on logits and class maps: cross-entropy with ``class_weights`` (a (C,) tensor on
    the logits' device, or None), Dice, Lovász-Softmax, or cross-entropy plus ``aux_weight`` times Dice or Lovász."""

    def __init__(self, loss="ce", class_weights=None, aux_weight=1.0):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.loss, self.class_weights, self.aux_weight = loss, class_weights, aux_weight

    def __call__(self, logits, target):
        if self.loss == "dice":
            return dice_loss(logits, target)
        if self.loss == "lovasz":
            return lovasz_softmax(logits, target)
        ce = F.cross_entropy(logits.float(), target, weight=self.class_weights)
        if self.loss == "ce":
            return ce
        aux = dice_loss(logits, target) if self.loss == "ce+dice" else lovasz_softmax(logits, target)
        return ce + self.aux_weight * aux


def build_criterion(loss="ce", class_weights=None, aux_weight=1.0):
    """The training loss (see Criterion); the defaults are the book's: plain pixel-wise cross-entropy."""
    return Criterion(loss, class_weights, aux_weight)


def pixel_shares(masks, n_classes):
    """(C,) share of the pixels of each class over some (H, W) class maps."""
    counts = np.zeros(n_classes, dtype=np.int64)
    for mask in masks:
        counts += np.bincount(mask.ravel(), minlength=n_classes)[:n_classes]
    return counts / counts.sum()


def median_frequency_weights(shares):
    """Median frequency balancing (Eigen and Fergus, ICCV 2015): ``w_c = median(f) / f_c`` for pixel shares
    ``f``, as a float32 tensor; a class with no pixels gets weight 0."""
    shares = np.asarray(shares, dtype=np.float64)
    weights = np.zeros_like(shares)
    seen = shares > 0
    weights[seen] = np.median(shares[seen]) / shares[seen]
    return torch.tensor(weights, dtype=torch.float32)


def resolve_class_weights(choice, train_set, class_names):
    """The cross-entropy's (C,) class weights for --class-weights ``choice`` (None for "none"), printed."""
    if choice == "none":
        return None
    if choice == "auto":
        weights = median_frequency_weights(pixel_shares(train_set.masks, len(class_names)))
    elif len(choice) != len(class_names):
        raise UsageError(f"--class-weights {','.join(map(str, choice))}: needs one weight per class, "
                         f"{len(class_names)} ({', '.join(class_names)})")
    else:
        weights = torch.tensor(choice, dtype=torch.float32)
    print("class weights: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(class_names, weights.tolist())))
    return weights
