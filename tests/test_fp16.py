"""fp16 inference, as a GPU without bf16 (T4, V100) runs it: the BatchNorm-folded model with fp16 weights and
inputs (model_utils.inference_model with torch.float16) must agree with float32 on real test images, with no
inf or NaN in its logits. Folding scales the conv weights and the residual stream grows with depth, so fp16's
range (65504) is the risk. Run on the CPU, which has fp16 kernels too."""
import torch

from data_generator import build_loader, make_dataset
from model_utils import inference_model
from seglib.checkpoints import load_checkpoint
from seglib.inference import to_input, upsample_argmax
from seglib.registry import model_from_checkpoint


def _largest_activation(model, x):
    """The largest absolute value any module of ``model`` outputs on ``x``."""
    peaks = []
    hooks = [m.register_forward_hook(lambda m, i, out: peaks.append(out.detach().abs().max().item()))
             for m in model.modules() if not list(m.children())]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return max(peaks)


@torch.inference_mode()
def test_fp16_inference_model_agrees_with_float32(tiny_checkpoint, drinks):
    model = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    dataset, _ = make_dataset(drinks, "test", 60, 80, augment="none", limit=4, workers=0)
    images, masks = next(iter(build_loader(dataset, 4, train=False, workers=0, pin_memory=False)))
    cpu = torch.device("cpu")
    # twelve steps leave the BatchNorm statistics near their start (momentum 0.01, the book's), far from what
    # the layers give: in eval mode the logits then reach 1e5. A trained model's statistics fit its layers, as
    # these do once measured on the images
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None  # a plain average over the batches seen
    with torch.no_grad():
        model.train()(to_input(images, cpu))
    model.eval()
    fp32 = inference_model(model, None, channels_last=False)
    fp16 = inference_model(model, torch.float16, channels_last=False)
    assert next(fp16.parameters()).dtype == torch.float16
    reference = fp32(to_input(images, cpu))  # (B, C, 60, 80)
    half = fp16(to_input(images, cpu, dtype=torch.float16))
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    # scored as evaluate.py scores: argmax at the labels' native 480x640
    native = masks[0].shape
    agree = (upsample_argmax(reference, native) == upsample_argmax(half.float(), native)).double().mean().item()
    assert agree >= 0.995, agree
    # the float32 activations stay far inside fp16's range, so no layer is near overflow
    assert _largest_activation(fp32, to_input(images, cpu)) < 65504 / 16
