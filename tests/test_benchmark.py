"""benchmark.py runs and reports every field (its numbers are measurements, not asserted targets)."""
import copy
import types

import pytest
import torch

import benchmark
import model_utils as mu
from fcn import build_fcn
from resnet import ConvTranspose2d
from seglib import profiling


def test_benchmark_reports_every_field(drinks, capsys, monkeypatch):
    compiled = []

    def inference_model(model, dtype=None, channels_last=True, compile=False):
        compiled.append(compile)  # the graph itself is tested in test_model; compiling it here costs half a minute
        return mu.inference_model(model, dtype, channels_last, False)

    steps = []

    def train_step(model, criterion, optimizer, scaler, x, y, dtype=None, loss_fn=None):
        kind = ("stock" if any(isinstance(m, benchmark.StockConvTranspose2d) for m in model.modules()) else "own",
                dtype, x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        if not steps or steps[-1] != kind:
            steps.append(kind)
        return mu_train_step(model, criterion, optimizer, scaler, x, y, dtype, loss_fn)

    mu_train_step = benchmark.train_step
    monkeypatch.setattr(benchmark, "inference_model", inference_model)
    monkeypatch.setattr(benchmark, "train_step", train_step)
    args = benchmark.get_args_parser().parse_args([
        "--height", "32", "--width", "48", "--batch-size", "2", "--steps", "1", "--warmup", "1", "--device", "cpu",
        "--data-path", str(drinks), "--workers", "0", "--data-images", "4", "--json"])
    r = benchmark.main(args)
    # the plain port and the float32 baseline in float32 eager, contiguous; the fast step autocast, channels_last
    assert steps == [("stock", None, False), ("own", None, False), ("own", mu.amp_dtype(torch.device("cpu")), True)]
    for key in ("train_img_s", "infer_img_s", "baseline_train_img_s", "baseline_infer_img_s", "fp32_train_img_s",
                "fp32_infer_img_s", "infer_eager_img_s", "onnx_infer_img_s", "gflops_per_img", "mfu", "data_img_s",
                "peak_mem_mb"):
        assert isinstance(r[key], (int, float)) and r[key] > 0, key
    # the derived fields are the measured rates put together as their names say
    # (to the 4 decimals the JSON keeps)
    assert r["train_speedup"] == pytest.approx(r["train_img_s"] / r["baseline_train_img_s"], rel=1e-3, abs=1e-4)
    assert r["train_gflop_s"] == pytest.approx(r["train_img_s"] * r["train_gflops_per_img"], rel=1e-3, abs=1e-4)
    assert r["mfu"] == pytest.approx(r["train_gflop_s"] / r["peak_bf16_gflops"], rel=1e-3, abs=1e-4)
    assert r["infer_gflop_s"] == pytest.approx(r["infer_img_s"] * r["gflops_per_img"], rel=1e-3, abs=1e-4)
    # forward + backward costs about three forward passes
    assert compiled == [False, True]  # infer_img_s is timed through evaluate.py --compile's frozen graph
    assert 2.5 < r["train_gflops_per_img"] / r["gflops_per_img"] < 3.5
    assert '"train_img_s"' in capsys.readouterr().out


def test_benchmark_of_a_torchvision_model(drinks):
    args = benchmark.get_args_parser().parse_args([
        "--model", "lraspp_mobilenet_v3_large", "--height", "64", "--width", "64", "--batch-size", "2", "--steps", "1",
        "--warmup", "1", "--device", "cpu", "--no-infer-compile", "--no-onnx", "--data-path", str(drinks),
        "--workers", "0", "--data-images", "4", "--json"])
    r = benchmark.main(args)
    assert r["model"] == "lraspp_mobilenet_v3_large"
    assert r["infer_speedup"] == pytest.approx(r["infer_img_s"] / r["baseline_infer_img_s"], rel=1e-3, abs=1e-4)
    # its depthwise convs' weight gradients are counted once, not once per channel
    assert 2.5 < r["train_gflops_per_img"] / r["gflops_per_img"] < 3.5


def test_timed_is_the_seconds_a_call_after_the_warmup(monkeypatch):
    """On a clock that each call moves on by a quarter of a second (the warm-up calls by 5 s), 0.25 s a call."""
    clock, calls = [100.0], []

    def step():
        calls.append(1)
        clock[0] += 5.0 if len(calls) <= 2 else 0.25

    monkeypatch.setattr(profiling, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    assert profiling.timed(step, steps=4, warmup=2, device=torch.device("cpu")) == pytest.approx(0.25)
    assert len(calls) == 6


def test_plain_port_is_the_same_network_with_stock_layers():
    torch.manual_seed(0)
    model = build_fcn(depth=11).eval()
    x = torch.rand(1, 3, 32, 48)
    plain = benchmark.plain_port(copy.deepcopy(model))
    kinds = {type(m) for m in plain.modules()}
    assert ConvTranspose2d not in kinds and benchmark.StockConvTranspose2d in kinds
    assert plain.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))


def test_data_pipeline_is_timed_for_each_worker_count(drinks):
    args = benchmark.get_args_parser().parse_args([
        "--data-only", "--height", "48", "--width", "64", "--device", "cpu", "--data-path", str(drinks),
        "--workers", "0", "1", "--data-images", "8", "--json"])
    r = benchmark.main(args)
    assert set(r["data_img_s_by_workers"]) == {"0", "1"} and all(v > 0 for v in r["data_img_s_by_workers"].values())
    assert r["data_img_s"] == r["data_img_s_by_workers"]["1"] and r["data_workers"] == 1
    assert "train_img_s" not in r  # no model measured


def test_gpu_defaults_time_long_enough_and_compile_once(monkeypatch):
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    parse = benchmark.get_args_parser().parse_args
    args = benchmark.resolve_args(parse([]), gpu)
    assert (args.steps, args.warmup, args.infer_compile) == (20, 5, False)
    assert benchmark.resolve_args(parse(["--compile"]), cpu).infer_compile is False
    assert benchmark.resolve_args(parse([]), cpu).infer_compile is True
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert benchmark.datasheet_gflops(gpu) == 989e3
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert benchmark.datasheet_gflops(gpu) == 756e3
    assert benchmark.datasheet_gflops(cpu) is None


def test_epoch_timing_starts_after_this_process_gives_its_device_memory_back(monkeypatch, tmp_path):
    """``--epoch`` runs train.py as a child process: on a GPU it must find the memory (cached blocks, CUDA graph
    pools) that the measurements in this process held."""
    events = []
    monkeypatch.setattr(benchmark, "measure_model", lambda args, device, r: events.append("measured"))
    monkeypatch.setattr(benchmark, "release_device_memory", lambda device: events.append(("released", device.type)))
    monkeypatch.setattr(benchmark, "time_epochs", lambda *a, **k: events.append("epochs") or {})
    args = benchmark.get_args_parser().parse_args(["--device", "cpu", "--epoch", "--data-path", str(tmp_path),
                                                   "--json"])
    benchmark.main(args)
    assert events == ["measured", ("released", "cpu"), "epochs"]
    monkeypatch.undo()  # the real release_device_memory, with the CUDA calls it makes recorded
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.compiler, "reset", lambda: calls.append("reset"))
    benchmark.release_device_memory(torch.device("cuda"))
    assert calls == ["reset", "empty_cache"]
