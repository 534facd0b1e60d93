"""TensorBoard logging of a training run, from the main rank only, under ``<run dir>/tb/``: the loss and rate at
the loop's existing host syncs, and each epoch's validation mIoU (both definitions), per-class IoU, speed and a
grid of validation predictions. metrics.jsonl stays the record of the run; this is a view of it.

Every value is logged against the global training step (epoch values at the step that ends their epoch). A
resumed run opens the log with ``purge_step`` one past the step it resumes from, so TensorBoard drops whatever
the interrupted run logged after its last checkpoint and no step appears twice."""
import importlib.util

import torch

from seglib.inference import SegmentationMetrics, confusion_matrix, predict, to_input, upsample_argmax
from seglib.plots import prediction_grid

GRID_IMAGES = 4  # validation images in the epoch's prediction grid (the first of the split, the same each epoch)


def tensorboard_available():
    """Whether the ``tensorboard`` package is installed (``torch.utils.tensorboard`` needs it)."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog:
    """A SummaryWriter on ``log_dir`` that drops what an interrupted run logged from ``purge_step`` on."""

    def __init__(self, log_dir, purge_step=1):
        from torch.utils.tensorboard import SummaryWriter  # imported only when logging is on

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def step(self, global_step, loss, lr):
        """The epoch's running training loss and the rate at a step where the loop already synced."""
        self.writer.add_scalar("train/loss", loss, global_step)
        self.writer.add_scalar("train/lr", lr, global_step)

    def epoch(self, global_step, record, class_names, model, val_set, device, dtype, channels_last):
        """Log an epoch's metrics.jsonl record (validation mIoU both ways, per-class IoU, loss, training speed)
        and predict the grid's validation images now; returns the job that draws and logs their figure (for
        the background writer: the drawing is the slow part)."""
        val = record["val"]
        self.writer.add_scalar("val/miou_per_image", val["miou_per_image"], global_step)
        self.writer.add_scalar("val/miou", val["miou"], global_step)
        for name, iou in zip(class_names, record["val_iou_per_class"]):
            self.writer.add_scalar(f"val_iou/{name}", iou, global_step)
        self.writer.add_scalar("epoch/train_loss", record["train_loss"], global_step)
        self.writer.add_scalar("epoch/img_s", record["train_images"] / record["seconds"], global_step)
        predictions, ious = validation_predictions(model, val_set, device, dtype, channels_last)
        title = f"validation, epoch {record['epoch']}"

        def draw():
            fig = prediction_grid(val_set.annotations, predictions, sorted(predictions), ious, title)
            self.writer.add_figure("val/predictions", fig, global_step, close=False)
            self.writer.flush()
        return draw

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        self.writer.close()


@torch.inference_mode()
def validation_predictions(model, val_set, device, dtype, channels_last, n=GRID_IMAGES):
    """{index: native-size uint8 class map} of the first ``n`` validation images, and their IoUs, for the grid:
    one forward pass of ``n`` images and ``n`` small copies to the host, whatever the split's size."""
    picks = list(range(min(n, len(val_set))))
    images = torch.stack([val_set[i][0] for i in picks])  # (n, 3, H, W) uint8 at the model's size
    was_training = model.training
    model.eval()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits = predict(model, to_input(images, device, channels_last)).float()  # (n, C, H, W)
    model.train(was_training)
    predictions, ious = {}, {}
    for i in picks:
        mask = torch.from_numpy(val_set.masks[i]).to(device)  # (H', W') native
        pred = upsample_argmax(logits[i:i + 1], mask.shape)[0]
        conf = confusion_matrix(pred, mask, logits.shape[1])
        predictions[i] = pred.to("cpu", torch.uint8).numpy()
        ious[i] = SegmentationMetrics.image_iou(conf).item()
    return predictions, ious

