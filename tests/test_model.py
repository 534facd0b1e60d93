"""The FCN / ResNet-v2 model: the book's parameter counts, shapes at any size, Keras defaults."""
import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import summary
from fcn import build_fcn, count_parameters
from model_utils import inference_model
from resnet import BN_MOMENTUM, ConvTranspose2d, ResNetV2, zero_init_residual_

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_fcn()


def test_counts_match_the_books_keras_model(model):
    trainable, running = count_parameters(model)
    assert trainable == 15_236_964
    assert running == 16_544


@pytest.mark.parametrize("size", [(480, 640), (120, 160), (123, 157), (32, 32)])
def test_output_has_the_input_size(model, size):
    with torch.inference_mode():
        out = model.eval()(torch.rand(1, 3, *size))
    assert out.shape == (1, 4, *size)


@pytest.mark.parametrize("depth", [20, 110])
def test_other_depths(depth):
    m = build_fcn(depth=depth).eval()
    assert len(m.backbone.stages[0]) == (depth - 2) // 9
    with torch.inference_mode():
        assert m(torch.rand(1, 3, 64, 96)).shape == (1, 4, 64, 96)


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4, 5])
def test_pyramid_layers(n_layers):
    m = build_fcn(n_classes=3, depth=11, n_layers=n_layers).eval()
    with torch.inference_mode():
        levels = m.pyramid(m.backbone(torch.rand(1, 3, 128, 128)))
        out = m(torch.rand(2, 3, 100, 76))
    assert len(levels) == n_layers + 1
    assert [lv.shape[-1] for lv in levels] == [32, 16, 8, 4, 2, 1][: n_layers + 1]
    assert out.shape == (2, 3, 100, 76)


@pytest.mark.parametrize("kwargs, words", [
    ({"depth": 55}, "9n + 2"), ({"depth": 2}, "9n + 2"), ({"depth": 56.0}, "9n + 2"),
    ({"n_layers": 0}, "n_layers"), ({"n_layers": -1}, "n_layers"),
])
def test_bad_config_is_a_value_error(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("+", r"\+")):
        build_fcn(**kwargs)


def test_bf16_autocast_forward_and_backward_agree_with_float32():
    """bf16 autocast against float32 on the same weights and batch, at tolerances about 1.5 times what was measured
    (mean logit difference 3.3% of the logits' spread, 97.8% of argmaxes alike, loss 0.06% apart, gradient
    cosine 0.93; bf16 keeps 8 bits of mantissa, about 0.4% a rounding, over some 60 layers)."""
    torch.manual_seed(0)
    m = build_fcn(depth=20).train()
    x = torch.rand(2, 3, 64, 80)
    y = torch.randint(0, 4, (2, 64, 80))
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        m.zero_grad()
        model = copy.deepcopy(m)  # the same BatchNorm statistics before each run
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        runs[dtype] = logits.detach(), loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])
    (ref, ref_loss, ref_grad), (low, low_loss, low_grad) = runs[torch.float32], runs[torch.bfloat16]
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().mean() < 0.05 * ref.std()
    assert (low.argmax(1) == ref.argmax(1)).float().mean() > 0.95
    assert low_loss == pytest.approx(ref_loss, rel=0.005)
    assert torch.nn.functional.cosine_similarity(low_grad, ref_grad, dim=0) > 0.85


def test_eval_is_deterministic_and_train_updates_bn_with_keras_momentum():
    torch.manual_seed(0)
    m = build_fcn(depth=11, n_layers=2)
    x = torch.rand(2, 3, 48, 64)
    m.eval()
    with torch.inference_mode():
        assert torch.equal(m(x), m(x))
    bn = m.backbone.stem.bn
    assert bn.momentum == BN_MOMENTUM == 0.01 and bn.eps == 1e-3
    before = bn.running_mean.clone()
    conv_out = m.backbone.stem.conv(x).detach()
    m.train()
    m(x)
    expected = 0.99 * before + 0.01 * conv_out.mean(dim=(0, 2, 3))
    assert torch.allclose(bn.running_mean, expected, atol=1e-6)
    assert not torch.equal(bn.running_mean, before)


def test_zero_init_residual_starts_every_unit_as_the_identity():
    """--zero-init-residual: each bottleneck unit's last kernel is zero, so a unit passes its input through (in
    training mode too), while the kernel still gets a gradient."""
    torch.manual_seed(0)
    backbone = ResNetV2(20)
    assert zero_init_residual_(backbone) == 6  # 3 stages of 2 units
    unit = backbone.stages[0][1]  # 64 -> 64 channels, identity shortcut
    x = torch.randn(2, 64, 8, 8)
    y = unit(x.clone())
    torch.testing.assert_close(y, x)
    y.square().sum().backward()
    assert unit.conv3.weight.grad.abs().sum() > 0
    assert all(torch.count_nonzero(u.conv3.weight) == 0 for stage in backbone.stages for u in stage)
    assert torch.count_nonzero(backbone.stages[0][1].conv2.weight) > 0  # the rest keeps the book's init


def test_he_normal_init_and_zero_bias():
    torch.manual_seed(0)
    conv = ResNetV2(20).stages[2][1].conv2  # 128 -> 128, 3x3: fan_in 1152
    std = (2.0 / (128 * 9)) ** 0.5
    w = conv.weight.detach()
    assert abs(w.std().item() / std - 1) < 0.03
    assert w.abs().max().item() <= 2 * std / 0.8796 + 1e-6  # truncated at 2 (pre-correction) std
    assert torch.count_nonzero(conv.bias) == 0


def test_l2_parameters_are_the_resnet_conv_kernels_only(model):
    l2 = {id(p) for p in model.l2_parameters()}
    resnet_kernels = {id(m.weight) for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)}
    assert l2 == resnet_kernels
    others = [p for p in list(model.pyramid.parameters()) + list(model.lateral.parameters()) if id(p) in l2]
    assert others == []
    assert all(p.dim() == 4 for p in model.l2_parameters())


def _with_bn_statistics(depth):
    """A seeded FCN of ``depth`` in eval mode whose BatchNorms have non-trivial running statistics."""
    torch.manual_seed(0)
    m = build_fcn(depth=depth).train()
    for _ in range(3):
        m(torch.rand(2, 3, 64, 64))
    return m.eval()


def test_fused_batchnorm_gives_the_same_output():
    m = _with_bn_statistics(20)
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        ref = m(x)
        fused = m.fuse_bn_()(x)
    # float32 rounding grows with the logits' size (tens here, from the classifier's Keras initialisation)
    assert torch.allclose(ref, fused, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_summary_prints_shapes_and_counts(capsys):
    summary.main(summary.get_args_parser().parse_args(["--height", "96", "--width", "128"]))
    out = capsys.readouterr().out
    assert "15,236,964" in out and "16,544" in out
    assert "(1, 256, 24, 32)" in out and "(1, 4, 96, 128)" in out


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_transposed_conv_matches_the_stock_layer(dtype):
    torch.manual_seed(0)
    ours = ConvTranspose2d(8, 6, 3, 2)
    nn.init.normal_(ours.bias)  # the zero init would hide a dropped bias
    full = nn.ConvTranspose2d(8, 6, 3, 2)  # the whole transposed conv, (2 * 5 + 1) x (2 * 7 + 1)
    full.load_state_dict(ours.state_dict())
    stock = lambda x: full(x)[..., :10, :14]  # TensorFlow's 'same' keeps the first 2H x 2W  # noqa: E731
    x = torch.randn(2, 8, 5, 7)
    grads = []
    for layer, params in ((ours, ours), (stock, full)):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            y = layer(x)
        assert y.shape == (2, 6, 10, 14) and y.dtype == (dtype or torch.float32)
        y.float().square().sum().backward()
        grads.append((y, params.weight.grad, params.bias.grad))
    with torch.no_grad():  # without a bias gradient our layer takes the fused-bias path; it matches the stock one
        torch.testing.assert_close(ours(x), stock(x))
    for a, b in zip(*grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2 if dtype else 1e-5, atol=0.1 if dtype else 1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings exist on Linux only")
def test_keep_freed_memory_stops_page_faulting_freed_blocks():
    # a fresh process with what train.py and evaluate.py import before they call it, so the allocator's state and
    # the address space are a script's (with torch alone, brk can meet a mapping and malloc falls back to mmap)
    code = textwrap.dedent("""
        import resource, torch
        import data_generator
        from model_utils import keep_freed_memory
        def page_faults_of_a_200mb_tensor():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = torch.ones(50_000_000)  # written, so every page is touched
            del t
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        default = min(page_faults_of_a_200mb_tensor() for _ in range(2))
        applied = keep_freed_memory()
        page_faults_of_a_200mb_tensor()  # the heap grows to hold it once
        print(default, applied, min(page_faults_of_a_200mb_tensor() for _ in range(2)))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    default, applied, kept = out.split()
    assert applied == "True"
    assert int(default) > 40_000  # glibc mmaps such a block and unmaps it on free: ~49,000 4 KiB pages each time
    assert int(kept) < 2_000


def test_frozen_inference_fuses_convs_and_matches_eager_for_any_batch_size():
    m = _with_bn_statistics(11)
    frozen = inference_model(m, channels_last=True, compile=True)
    with torch.inference_mode():
        for batch in (2, 3):  # a short last batch runs through the same graph
            x = torch.rand(batch, 3, 64, 96)
            ref = m(x)  # float32 rounding scales with the logits, tens here (the Keras classifier's init)
            torch.testing.assert_close(frozen(x.contiguous(memory_format=torch.channels_last)), ref,
                                       rtol=1e-4, atol=1e-5 * ref.abs().max().item())
        with torch.profiler.profile() as prof:
            frozen(x.contiguous(memory_format=torch.channels_last))
    # freezing took effect: the convs run as oneDNN convs with their ReLU / residual add fused in
    assert "mkldnn::_convolution_pointwise" in {e.key for e in prof.key_averages()}
