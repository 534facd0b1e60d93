"""seglib/profiling.py: FLOPs counted on the meta device, grouped convolutions' backward counted once."""
import pytest
import torch

from seglib import profiling


def test_grouped_conv_backward_flops_are_counted_once():
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64)  # depthwise, as in MobileNetV3
    dense = torch.nn.Conv2d(64, 64, 3, padding=1)
    for module, groups in ((conv, 64), (dense, 1)):
        x = torch.rand(2, 64, 16, 16, requires_grad=True)
        forward = 2 * 2 * 64 * (64 // groups) * 9 * 16 * 16
        with torch.utils.flop_counter.FlopCounterMode(
                display=False, custom_mapping={torch.ops.aten.convolution_backward: profiling.conv_backward_flop}) as c:
            module(x).sum().backward()
        assert c.get_total_flops() == 3 * forward  # the forward, then the input and the weight gradients


def test_flops_are_counted_on_the_meta_device_at_any_size():
    """Counting allocates nothing: at 4800x6400 real tensors would need tens of GB. Convolution FLOPs grow with the
    pixels, so the count is about 2500 times the one at 96x128 (13.85 / 41.54 GFLOPs, counted on real tensors before)."""
    small = profiling.model_gflops("fcn_resnet56v2", 96, 128)
    assert small == pytest.approx((13.85, 41.54), abs=0.01)
    large = profiling.model_gflops("fcn_resnet56v2", 4800, 6400)
    # the head's transposed convs read one padded row and column more (resnet.py), a share that shrinks with size
    assert large == pytest.approx((2500 * small[0], 2500 * small[1]), rel=0.04)
    assert large[0] < 2500 * small[0]


def test_byte_counter_counts_what_each_operator_reads_and_writes():
    """A conv reads its input, weight and bias and writes its output; a view moves nothing; an in-place add reads
    two tensors and writes one. Worked out by hand in bf16 (2 bytes a value)."""
    with torch.device("meta"):
        x = torch.rand(2, 3, 8, 8, dtype=torch.bfloat16)
        w, b = torch.rand(4, 3, 3, 3, dtype=torch.bfloat16), torch.rand(4, dtype=torch.bfloat16)
    with profiling.ByteCounter() as counter:
        y = torch.nn.functional.conv2d(x, w, b, padding=1)  # (2, 4, 8, 8)
    assert (counter.read, counter.written) == (2 * (384 + 108 + 4), 2 * 512)
    with profiling.ByteCounter() as counter:
        y.view(-1)
        y.add_(y)
    assert (counter.read, counter.written) == (2 * 2 * 512, 2 * 512)


def test_training_traffic_grows_with_the_pixels():
    small, large = profiling.training_gbytes("fcn_resnet56v2", 96, 128), profiling.training_gbytes("fcn_resnet56v2", 192, 256)
    assert 3.5 < large / small < 4.1  # activations scale with the pixels; the weights' share does not


def test_step_flops_of_a_part_of_a_model_with_its_own_loss():
    """A lone conv on the meta device, summed: forward 2 * 4 * 27 * 64 per 8x8 image, and a backward of the weight
    gradient alone (the input needs none), as much again. The backbone of the registered model costs less than
    the model, which model_gflops counts the same way."""
    with torch.device("meta"):
        conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    forward = 2 * 4 * 27 * 64 / 1e9
    assert profiling.step_gflops(conv, 8, 8, loss=lambda out: out.sum()) == pytest.approx((forward, 2 * forward))
    with torch.device("meta"):
        model = profiling.build_model("fcn_resnet56v2", 4)
    whole = profiling.step_gflops(model, 96, 128)
    assert whole == profiling.model_gflops("fcn_resnet56v2", 96, 128)
    backbone = profiling.step_gflops(model.backbone, 96, 128, loss=lambda out: out.sum())
    assert 0 < backbone[1] < whole[1] / 2
