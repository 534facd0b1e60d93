"""benchmark.py --profile and --epoch: the profile's categories, layer groups and phases on the CPU, and whole
epochs of train.py timed from its metrics."""
import time
from collections import OrderedDict

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import benchmark
from seglib.profiling import COMPILED_GROUP, categorise, epoch_figures, profile_steps, summarise

CPU = torch.device("cpu")


@pytest.mark.parametrize("name,category", [
    ("sm90_xmma_wgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "conv weight grad"),
    ("sm90_xmma_dgrad_implicit_gemm_bf16bf16", "conv data grad"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16", "convolution forward"),
    ("aten::mkldnn_convolution", "convolution forward"), ("aten::convolution_backward", "conv backward (data + weight)"),
    ("void at::native::batch_norm_collect_statistics_channels_last_kernel", "batchnorm"),
    ("aten::native_batch_norm_backward", "batchnorm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::threshold_kernel_impl>", "pointwise"),
    ("void at::native::(anonymous namespace)::fused_adam_kernel", "optimizer"),
    ("Memcpy HtoD (Pageable -> Device)", "copies"), ("aten::nll_loss2d_forward", "loss"),
    ("aten::upsample_bilinear2d", "upsample"), ("aten::empty_strided", "other")])
def test_kernels_and_operators_get_their_category(name, category):
    assert categorise(name) == category


def test_cpu_profile_splits_a_step_by_category_group_and_phase():
    args = benchmark.get_args_parser().parse_args(["--device", "cpu", "--height", "64", "--width", "96", "--steps",
                                                   "1", "--warmup", "1"])
    p = benchmark.measure_profile(args, CPU)
    categories, groups, phases = (summarise(p, k) for k in ("category", "group", "phase"))
    assert {"convolution forward", "conv backward (data + weight)", "batchnorm", "pointwise", "optimizer"} <= set(
        c for c, ms in categories.items() if ms > 0)
    assert {"stem", "stage1", "stage2", "stage3", "pyramid", "up", "classifier", "optimizer"} <= set(groups)
    assert set(phases) == {"forward", "backward", "optimizer"} and min(phases.values()) > 0
    # each stage's backward is there too, found through the autograd sequence numbers
    assert {r["group"] for r in p["rows"] if r["phase"] == "backward"} >= {"stage1", "stage2", "stage3", "up"}
    # the rows hold every operator's own time: torch.profiler's own table of the same step, less the ranges
    model, step = benchmark.training_step(args, CPU, fast=True)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    own_ms = sum(e.self_cpu_time_total for e in prof.key_averages()
                 if not e.key.startswith(("group:", "forward", "optimizer"))) / 1e3
    assert p["busy_ms"] == pytest.approx(own_ms, rel=0.3)


def _two_groups():
    """A model of two layer groups: a heavy conv, then a ReLU."""
    return torch.nn.Sequential(OrderedDict(heavy=torch.nn.Conv2d(3, 32, 5, padding=2), light=torch.nn.ReLU()))


def test_backward_operators_go_to_the_group_of_the_forward_they_differentiate():
    model, x = _two_groups(), torch.rand(2, 3, 48, 48)
    p = profile_steps(model, lambda: model(x).mean().backward(), CPU, steps=1)
    backward = [r for r in p["rows"] if r["phase"] == "backward" and r["ms"] > 0]
    conv_backward = {r["group"] for r in backward if r["category"] == "conv backward (data + weight)"}
    assert conv_backward == {"heavy"}
    assert "light" in {r["group"] for r in backward if r["category"] == "pointwise"}  # threshold_backward


def test_the_step_is_timed_with_the_profiler_off():
    """A step that is slow only while profiled: its wall time is the unprofiled one."""
    model, x = _two_groups(), torch.rand(1, 3, 16, 16)

    def step():
        model(x).mean().backward()
        if torch._C._autograd._profiler_enabled():
            time.sleep(0.05)

    p = profile_steps(model, step, CPU, steps=2)
    assert p["step_ms"] < 25


def test_a_compiled_step_is_not_split_by_layer(monkeypatch):
    """Compiled code skips the layer groups' ranges and fuses across layers: no per-layer table is claimed."""
    model, x = _two_groups(), torch.rand(1, 3, 16, 16)
    compiled = torch.compile(model, backend="eager")
    p = profile_steps(model, lambda: compiled(x).mean().backward(), CPU, steps=1, by_layer=False)
    assert {r["group"] for r in p["rows"]} == {COMPILED_GROUP}
    calls = []
    monkeypatch.setattr(benchmark, "training_step", lambda *a, **k: (model, lambda: None))
    monkeypatch.setattr(benchmark, "profile_steps", lambda *a, **k: calls.append(k))
    for flags in ([], ["--compile"]):
        args = benchmark.get_args_parser().parse_args(["--device", "cpu", "--steps", "1", "--warmup", "1", *flags])
        benchmark.measure_profile(args, CPU)
    assert calls == [{"by_layer": True}, {"by_layer": False}]


def test_epoch_figures_come_from_the_metrics_timestamps():
    rows = [{"epoch": 1, "seconds": 9.0, "time": 110.0, "train_images": 900},
            {"epoch": 2, "seconds": 3.5, "time": 114.0, "train_images": 900},
            {"epoch": 3, "seconds": 3.9, "time": 119.0, "train_images": 900}]
    f = epoch_figures(rows, started=100.0)
    assert f["epoch_s"] == 4.5 and f["epoch_img_s"] == 200.0 and f["epoch_s_each"] == [4.0, 5.0]
    assert f["startup_s"] == 1.0 and f["first_epoch_s"] == 9.0
    assert f["book_run_min"] == pytest.approx((9.0 + 99 * 4.5) / 60)


def test_benchmark_epoch_runs_train_py_and_reports_the_epoch_rate(drinks, tmp_path):
    args = benchmark.get_args_parser().parse_args([
        "--data-only", "--device", "cpu", "--height", "32", "--width", "40", "--data-path", str(drinks),
        "--workers", "0", "--data-images", "4", "--epoch", "--epoch-count", "2", "--epoch-limit", "12", "--json",
        "--epoch-flags", "--val-fraction 0.01 --workers 0 --batch-size 4 --save-every 2"])
    r = benchmark.main(args)
    assert r["epochs_timed"] == 2 and r["epoch_train_images"] == 12
    assert r["epoch_img_s"] == pytest.approx(12 / r["epoch_s"], rel=1e-3)
    assert len(r["epoch_s_each"]) == 1 and r["epoch_s"] == pytest.approx(r["epoch_s_each"][0], rel=1e-3)
    assert r["book_run_min"] == pytest.approx((r["first_epoch_s"] + 99 * r["epoch_s"]) / 60, rel=1e-3)
    assert "--save-every 2" in r["command"] and r["compile_lines"] == []  # nothing compiled without --compile
