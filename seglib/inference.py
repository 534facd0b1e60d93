"""Running a model and scoring what it predicts: uint8 batches to model inputs, logits at the native mask
size, flip test-time augmentation, and the confusion-matrix metrics (mIoU over the dataset, mIoU per image,
per-class IoU, pixel accuracy) gathered across processes."""

import torch
from torch import distributed as dist
from torch.nn import functional as F

from model_utils import amp_dtype, inference_model
from seglib.files import progress

# ----------------------------------------------------------------------------------------------------------- metrics
# Both definitions: the book's per-image mIoU and the dataset-level mIoU of one confusion matrix, accumulated on the
# device (no host sync per image) and summed over DDP ranks.

def confusion_matrix(pred, target, n_classes):
    """(n_classes, n_classes) int64 counts, rows ground truth, columns prediction.

    A scatter-add rather than ``torch.bincount``, which on a GPU reads the largest index back to the host (a
    sync per image); this stays on the device.
    """
    idx = target.reshape(-1).long() * n_classes + pred.reshape(-1).long()
    counts = torch.zeros(n_classes * n_classes, dtype=torch.int64, device=idx.device)
    counts.index_add_(0, idx, torch.ones_like(idx))
    return counts.reshape(n_classes, n_classes)


def _safe_div(num, den):
    return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, float("nan")))


class SegmentationMetrics:
    """Accumulates both metric definitions over images.

    - The book's: per image, IoU averaged over the classes present in its ground truth, then averaged over
      images (``miou_per_image``), and per-image pixel accuracy averaged over images.
    - The dataset-level one: a confusion matrix over all pixels gives per-class IoU; ``miou`` is their mean
      over classes present in the ground truth or the predictions.
    """

    def __init__(self, n_classes, device="cpu"):
        self.n_classes = n_classes
        self.confusion = torch.zeros(n_classes, n_classes, dtype=torch.int64, device=device)
        # sum of per-image mIoU, sum of per-image pixel accuracy, number of images
        self.per_image = torch.zeros(3, dtype=torch.float64, device=device)
        self.image_ious = []

    def update(self, pred, target):
        """Add one image: ``pred`` and ``target`` are (H, W) class maps of the same size."""
        conf = confusion_matrix(pred, target, self.n_classes)
        self.confusion += conf
        iou = self.image_iou(conf)
        self.image_ious.append(iou)
        acc = conf.diagonal().sum().double() / conf.sum().clamp(min=1)
        self.per_image += torch.stack([iou, acc, torch.ones((), dtype=torch.float64, device=acc.device)])

    @staticmethod
    def image_iou(conf):
        """The book's per-image mIoU: mean IoU over the classes present in the image's ground truth."""
        conf = conf.double()
        tp, gt, pr = conf.diagonal(), conf.sum(1), conf.sum(0)
        present = gt > 0  # so union > 0 too; masking with where avoids a host sync on GPU
        iou = torch.where(present, tp / (gt + pr - tp).clamp(min=1), torch.zeros_like(tp))
        return iou.sum() / present.sum().clamp(min=1)

    def all_reduce(self):
        """Sum the counts over all ranks (each image was seen by exactly one rank)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.confusion)
            dist.all_reduce(self.per_image)

    def compute(self, class_names=None):
        """A dict of plain floats: both mIoU definitions, pixel accuracies, per-class rows and n_images."""
        conf = self.confusion.double().cpu()
        tp, gt, pr = conf.diagonal(), conf.sum(1), conf.sum(0)
        iou = _safe_div(tp, gt + pr - tp)
        acc = _safe_div(tp, gt)
        n_images = int(self.per_image[2].item())
        names = class_names or [str(c) for c in range(self.n_classes)]
        total = max(gt.sum().item(), 1.0)
        return {
            "miou_per_image": self.per_image[0].item() / max(n_images, 1),
            "pixel_accuracy_per_image": self.per_image[1].item() / max(n_images, 1),
            "miou": iou[(gt + pr) > 0].mean().item(),
            "pixel_accuracy": (tp.sum() / conf.sum().clamp(min=1)).item(),
            "mean_class_accuracy": acc[gt > 0].mean().item(),
            "per_class": [{"name": names[c], "iou": _num(iou[c]), "accuracy": _num(acc[c]),
                           "share": gt[c].item() / total} for c in range(self.n_classes)],
            "n_images": n_images,
        }


def _num(x):
    """A float, or None for NaN (JSON has no NaN)."""
    x = float(x)
    return None if x != x else x


def format_metrics_table(metrics):
    """The per-class table and the summary lines, as a string."""
    lines = [f"{'class':<12}{'IoU':>8}{'accuracy':>10}{'pixels':>9}"]
    for row in metrics["per_class"]:
        iou = "-" if row["iou"] is None else f"{row['iou']:.4f}"
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        lines.append(f"{row['name']:<12}{iou:>8}{acc:>10}{row['share']:>9.2%}")
    lines.append(f"mIoU per image (book): {metrics['miou_per_image']:.4f}   "
                 f"pixel accuracy per image: {metrics['pixel_accuracy_per_image']:.4f}")
    lines.append(f"mIoU (dataset): {metrics['miou']:.4f}   pixel accuracy: {metrics['pixel_accuracy']:.4f}   "
                 f"mean class accuracy: {metrics['mean_class_accuracy']:.4f}   images: {metrics['n_images']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- running a model

TTA_MODES = ("none", "flip", "scales", "flip+scales")
TTA_SCALES = (1.0, 1.25, 1.5)  # input sizes of the "scales" modes, relative to the model's input size


def to_input(images, device, channels_last=False, dtype=None):
    """uint8 (B, 3, H, W) images -> [0, 1] floats on ``device`` (the book's img_as_float scaling).

    The copy to the device moves uint8, a quarter of the bytes of float32. ``dtype`` casts the result (for a
    model whose weights were cast by ``inference_model``).
    """
    x = images.to(device, non_blocking=True).float().div_(255)
    if dtype is not None:
        x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def tta_views(tta):
    """The (scale, mirrored) views that ``tta`` averages over."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    scales = TTA_SCALES if "scales" in tta else (1.0,)
    return [(scale, mirrored) for scale in scales for mirrored in ((False, True) if "flip" in tta else (False,))]


def tta_cost(tta):
    """Compute of ``tta`` in forward passes at the model's input size (pixels count: a 1.5x view costs 2.25)."""
    return sum(scale ** 2 for scale, _ in tta_views(tta))


def _resize(x, size):
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=False).to(x.dtype)


def predict(fast, x, tta="none"):
    """float32 (B, C, H, W) logits of ``fast`` on ``x`` (H, W: the model's input size), averaged over the views of
    ``tta`` (test-time augmentation): ``"flip"`` adds the horizontal mirror, mirrored back (twice the compute);
    ``"scales"`` runs ``x`` resized bilinearly to each of TTA_SCALES of its size, the logits resized back to
    (H, W); ``"flip+scales"`` both (see tta_cost)."""
    size = x.shape[-2:]
    total = None
    for scale, mirrored in tta_views(tta):
        view = _resize(x, (round(size[0] * scale), round(size[1] * scale)))
        if mirrored:
            view = view.flip(-1)
        if x.is_contiguous(memory_format=torch.channels_last):
            view = view.contiguous(memory_format=torch.channels_last)
        logits = fast(view).float()
        logits = _resize(logits.flip(-1) if mirrored else logits, size)
        total = logits if total is None else total + logits
    return total / len(tta_views(tta))


def upsample_argmax(logits, size):
    """Class map at ``size`` from (B, C, h, w) logits, resizing the logits (not the labels) bilinearly."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits.argmax(1)  # (B, H, W)


def predictor(model, dtype=None, channels_last=False, compile=False):
    """The fast inference form of ``model`` (see model_utils.inference_model); an exported model already is one."""
    if is_exported(model):
        return model
    return inference_model(model, dtype, channels_last, compile)


def input_dtype(model, device, amp=True):
    """The dtype ``model``'s inputs are cast to: the autocast dtype, float32 (None) for an exported model."""
    return None if is_exported(model) else amp_dtype(device, amp)


def is_exported(model):
    """Whether ``model`` is an exported model (onnx_model.OnnxModel, run by onnxruntime) rather than PyTorch's."""
    return not isinstance(model, torch.nn.Module)


@torch.inference_mode()
def evaluate_model(model, loader, device, n_classes, dtype=None, channels_last=False, keep_predictions=False,
                   compile=False, tta="none", bar=None):
    """Score ``model`` (a PyTorch model, or an OnnxModel) on an evaluation loader at native label resolution
    (``compile``: through a frozen graph, see model_utils.FrozenInference; ``tta``: see ``predict``).

    Returns (SegmentationMetrics, predictions): the predictions are uint8 (H, W) class maps in loader order
    when ``keep_predictions`` is set, else None. The metrics are not reduced across ranks. ``bar``: the
    progress bar's title (images scored; drawn only on a terminal), None for none.
    """
    fast = predictor(model, dtype, channels_last, compile)  # BN folded, low-precision weights: a copy
    metrics = SegmentationMetrics(n_classes, device)
    predictions = [] if keep_predictions else None
    total = len(loader.sampler) if hasattr(loader, "sampler") else None
    images_bar = progress(total=total, desc=bar, unit="img", enabled=bar is not None, leave=False)
    for images, masks in loader:
        images_bar.update(len(masks))
        logits = predict(fast, to_input(images, device, channels_last, dtype), tta)  # (B, C, h, w)
        same_size = all(m.shape == masks[0].shape for m in masks)
        preds = upsample_argmax(logits, masks[0].shape) if same_size else None
        for i, mask in enumerate(masks):
            pred = preds[i] if same_size else upsample_argmax(logits[i:i + 1], mask.shape)[0]
            metrics.update(pred, mask.to(device, non_blocking=True))
            if keep_predictions:
                predictions.append(pred.to("cpu", torch.uint8).numpy())
    images_bar.close()
    return metrics, predictions
