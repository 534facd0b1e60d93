"""Running a trained model on batches: input scaling, the fast inference form, test-time augmentation, logits
resized to the labels, and scoring a loader (what training's validation, evaluate.py, export.py and benchmark.py
share)."""
import torch
from torch.nn import functional as F

from model_utils import amp_dtype, inference_model
from seglib.metrics import SegmentationMetrics
from seglib.progress import progress

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
