"""Segmentation metrics, in both definitions: the book's per-image mIoU and the dataset-level mIoU of one
confusion matrix, accumulated on the device (no host sync per image) and summed over DDP ranks."""
import torch
from torch import distributed as dist


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
