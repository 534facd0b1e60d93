"""The GPU path: mixed-precision training steps without host syncs, CUDA evaluation against CPU float32, the
frozen compiled graph, benchmark.py on CUDA and a 2-process NCCL run. They run where CUDA is available (the GPU
protocol of ../shared/gpu/README.md runs the whole suite there) and are skipped, with the reason, elsewhere."""
import json
import os
import subprocess
import sys

import pytest
import torch

import benchmark
from data_generator import build_loader, make_dataset
from evaluate import evaluate_model, to_input
from fcn import build_fcn
from model_utils import (BASE_LR, amp_dtype, inference_model, load_checkpoint, make_grad_scaler,
                         model_from_checkpoint)
from resnet import L2_WEIGHT
from train import build_criterion, build_optimizer, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: GPU tests need a GPU")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.device("cuda")


def _test_batch(drinks, n, height=96, width=128):
    """The first ``n`` test images at height x width (uint8) and their native masks."""
    dataset, _ = make_dataset(drinks, "test", height, width, augment="none", limit=n, workers=0)
    return next(iter(build_loader(dataset, n, train=False, workers=0, pin_memory=False)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_training_step_learns_without_host_sync(drinks, dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    torch.manual_seed(0)
    model = build_fcn().to(CUDA, memory_format=torch.channels_last)
    optimizer = build_optimizer(model, BASE_LR, L2_WEIGHT)
    assert optimizer.defaults["fused"] is True
    scaler = make_grad_scaler(CUDA, dtype)
    assert scaler.is_enabled() == (dtype == torch.float16)
    images, _ = _test_batch(drinks, 4)
    x = to_input(images, CUDA, channels_last=True)
    # a learnable target from the batch itself, at the input size: a fixed batch whose loss must fall
    target = (x.mean(1) * 4).long().clamp(max=3)
    criterion = build_criterion()
    for _ in range(3):  # cuDNN autotuning and the allocator's first growth happen here
        train_step(model, criterion, optimizer, scaler, x, target, dtype)
    torch.cuda.synchronize()
    losses = []
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the step raises
    try:
        for _ in range(8):
            losses.append(train_step(model, criterion, optimizer, scaler, x, target, dtype).detach())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    losses = torch.stack(losses).float().cpu()
    assert torch.isfinite(losses).all()
    assert losses[-1] < losses[0], losses


def test_evaluate_model_on_cuda_matches_cpu_float32(tiny_checkpoint, drinks):
    model = model_from_checkpoint(load_checkpoint(tiny_checkpoint)).eval()
    dataset, _ = make_dataset(drinks, "test", 60, 80, augment="none", limit=12, workers=0)
    loader = build_loader(dataset, 5, train=False, workers=0)  # a short last batch of 2
    cpu_metrics, cpu_preds = evaluate_model(model, loader, torch.device("cpu"), 4, None, False, keep_predictions=True)
    gpu_metrics, gpu_preds = evaluate_model(model.to(CUDA), loader, CUDA, 4, amp_dtype(CUDA), True,
                                            keep_predictions=True)
    agree = sum(int((a == b).sum()) for a, b in zip(cpu_preds, gpu_preds)) / sum(a.size for a in cpu_preds)
    assert agree >= 0.995, agree
    assert gpu_metrics.compute()["miou"] == pytest.approx(cpu_metrics.compute()["miou"], abs=0.01)


@torch.inference_mode()
def test_frozen_graph_on_cuda_matches_eager(tiny_checkpoint, drinks):
    model = model_from_checkpoint(load_checkpoint(tiny_checkpoint)).to(CUDA).eval()
    dtype = amp_dtype(CUDA)
    eager = inference_model(model, dtype, channels_last=True)
    frozen = inference_model(model, dtype, channels_last=True, compile=True)
    for n in (3, 2):  # a second batch size reuses the graph (dynamic batch)
        images, _ = _test_batch(drinks, n, 60, 80)
        x = to_input(images, CUDA, channels_last=True, dtype=dtype)
        a, b = eager(x).float(), frozen(x).float()
        assert b.shape == a.shape == (n, 4, 60, 80) and torch.isfinite(b).all()
        assert (a.argmax(1) == b.argmax(1)).double().mean().item() >= 0.995


def test_benchmark_on_cuda_reports_its_fields(drinks, capsys):
    args = benchmark.get_args_parser().parse_args([
        "--height", "64", "--width", "96", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--device", "cuda",
        "--data-path", str(drinks), "--workers", "0", "--data-images", "8", "--json"])
    r = benchmark.main(args)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == r
    for key in ("train_img_s", "infer_img_s", "baseline_train_img_s", "baseline_infer_img_s", "infer_eager_img_s",
                "gflops_per_img", "mfu", "peak_bf16_gflops", "data_img_s", "peak_mem_mb"):
        assert isinstance(r[key], (int, float)) and r[key] > 0, key
    assert r["device"].startswith("cuda") and r["onnx_infer_img_s"] is None  # onnxruntime is timed on CPUs only
    assert r["peak_mem_source"] == "torch.cuda.max_memory_allocated"
    assert r["peak_mem_mb"] == pytest.approx(torch.cuda.max_memory_allocated() / 2 ** 20, rel=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="a 2-process NCCL run needs 2 GPUs")
def test_two_process_nccl_run(tmp_path, drinks):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--data-path", str(drinks), "--output-dir", str(tmp_path / "w"), "--figures-dir", str(tmp_path / "f"),
           "--run-name", "nccl", "--height", "64", "--width", "96", "--limit", "32", "--val-fraction", "0.005",
           "--epochs", "2", "--workers", "2", "--batch-size", "2", "--sync-bn"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(ln) for ln in (tmp_path / "w" / "nccl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and lines[-1]["val"]["n_images"] == 5
    assert json.loads((tmp_path / "w" / "nccl" / "test_metrics.json").read_text())["n_images"] == 51
