"""The GPU path: mixed-precision training steps and whole epochs without per-step host syncs, an interrupted run
resumed on CUDA, EMA and compiled training (CUDA graphs and the compile cache too), the loader path and
TensorBoard on CUDA, CUDA evaluation against CPU float32, the frozen compiled graph, benchmark.py on CUDA (its
profile and epoch timing too) and a 2-process NCCL run. They run where CUDA is available (the GPU plan of
../shared/gpu/README.md runs this file there) and are skipped, with the reason, elsewhere; the amp choice by GPU
generation is monkeypatched and runs everywhere."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import benchmark
import model_utils
import train
from data_generator import build_loader, make_dataset
from fcn import build_fcn
from model_utils import amp_dtype, inference_model, make_grad_scaler
from resnet import L2_WEIGHT
from seglib import engine
from seglib.checkpoints import load_checkpoint, save_checkpoint
from seglib.engine import BASE_LR, build_optimizer, train_step
from seglib.inference import evaluate_model, to_input
from seglib.losses import build_criterion
from seglib.profiling import COMPILED_GROUP
from seglib.registry import model_from_checkpoint

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: GPU tests need a GPU")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.device("cuda")


@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
                         ids=["V100", "T4", "A100", "H100"])
def test_amp_dtype_follows_the_gpu_generation(monkeypatch, capability, expected):
    """bf16 only with native bf16 tensor cores; is_bf16_supported() also says yes where bf16 is emulated."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert amp_dtype(CUDA) == expected
    assert amp_dtype(CUDA, enabled=False) is None


def _train_args(tmp_path, drinks, *extra):
    return train.get_args_parser().parse_args([
        "--data-path", str(drinks), "--output-dir", str(tmp_path / "w"), "--figures-dir", str(tmp_path / "f"),
        "--run-name", "run", "--device", "cuda", "--height", "64", "--width", "96", "--val-fraction", "0.005",
        "--batch-size", "4", *map(str, extra)])


@needs_cuda
def test_interrupted_cuda_run_resumes_on_one_gpu_and_under_fp16(tmp_path, drinks, monkeypatch, ctrl_c_at_step):
    """Ctrl-C mid-epoch on CUDA, then --resume: from a last.pt whose RNG states are a 4-GPU run's list, on a GPU
    taken for one without bf16 (fp16 and a GradScaler, which the bf16 run saved disabled and empty)."""
    common = ("--limit", 24, "--epochs", 2, "--workers", 2, "--no-test")
    monkeypatch.setattr(train, "build_criterion", lambda *a: ctrl_c_at_step(9))  # epoch 2, step 3 of 6
    assert train.main(_train_args(tmp_path, drinks, *common)) is None
    last = tmp_path / "w" / "run" / "last.pt"
    ckpt = load_checkpoint(last)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 3) and ckpt["scaler"] == {}
    assert isinstance(ckpt["rng"]["cuda"], torch.Tensor)
    ckpt["rng"]["cuda"] = [ckpt["rng"]["cuda"]] * 4
    save_checkpoint(ckpt, last)
    monkeypatch.undo()
    monkeypatch.setattr(model_utils, "cuda_has_bf16", lambda device: False)
    train.main(_train_args(tmp_path, drinks, *common, "--resume"))
    lines = [json.loads(ln) for ln in (tmp_path / "w" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert json.loads((tmp_path / "w" / "run" / "config.json").read_text())["autocast"] == "torch.float16"
    resumed = load_checkpoint(last)
    assert resumed["epoch"] == 2 and resumed["scaler"]["scale"] > 0
    assert all(torch.isfinite(v).all() for v in resumed["model"].values() if v.is_floating_point())


def _count_syncs(fn):
    """(fn(), the host syncs it made), counted by CUDA's sync debug mode."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return result, sum("synchroniz" in str(w.message) for w in caught)


@needs_cuda
def test_an_epoch_and_an_evaluation_sync_only_at_the_checks(drinks):
    """train_one_epoch reads the GPU every CHECK_EVERY steps, not every step; evaluation never per image."""
    _, seen = _count_syncs(lambda: torch.ones(1, device=CUDA).item())
    assert seen >= 1  # the counter sees a sync
    torch.manual_seed(0)
    dtype = amp_dtype(CUDA)
    train_set, _ = make_dataset(drinks, "train", 64, 96, "flip", limit=80, workers=0)
    loader = build_loader(train_set, 4, True, workers=0)  # 20 steps
    model = build_fcn().to(CUDA, memory_format=torch.channels_last)
    optimizer, scaler = build_optimizer(model, BASE_LR, L2_WEIGHT), make_grad_scaler(CUDA, dtype)
    trainer = engine.Trainer(model, build_criterion(), optimizer, scaler, CUDA, dtype, channels_last=True,
                             is_main=False)

    def epoch(n):
        loader.sampler.set_epoch(n)
        trainer.loss_state.zero_()
        with engine.StopRequest() as stop:
            return engine.train_one_epoch(trainer, loader, n, 2, lambda step: BASE_LR, stop)

    epoch(0)  # cuDNN autotuning and the allocator's growth
    (steps, stopped), syncs = _count_syncs(lambda: epoch(1))
    assert steps == 20 and not stopped and trainer.loss_state[1].item() == 20
    assert syncs <= 4 * (steps // engine.CHECK_EVERY + 1) < steps, syncs
    val_set, _ = make_dataset(drinks, "test", 64, 96, augment="none", limit=12, workers=0)
    val_loader = build_loader(val_set, 4, train=False, workers=0)
    (metrics, _), syncs = _count_syncs(lambda: evaluate_model(model, val_loader, CUDA, 4, dtype, True))
    assert syncs < 12, syncs
    assert metrics.compute()["n_images"] == 12


@needs_cuda
def test_ema_and_compiled_training_on_cuda(tmp_path, drinks):
    train.main(_train_args(tmp_path, drinks, "--limit", 16, "--epochs", 1, "--workers", 0, "--no-test", "--ema", 0.9,
                           "--compile"))
    ckpt = load_checkpoint(tmp_path / "w" / "run" / "best.pt")
    assert ckpt["ema"]["updates"] == 4
    live, averaged = ckpt["model"], ckpt["ema"]["model"]
    assert all(torch.isfinite(v).all() for v in averaged.values() if v.is_floating_point())
    assert not torch.equal(live["classifier.weight"], averaged["classifier.weight"])


def _test_batch(drinks, n, height=96, width=128):
    """The first ``n`` test images at height x width (uint8) and their native masks."""
    dataset, _ = make_dataset(drinks, "test", height, width, augment="none", limit=n, workers=0)
    return next(iter(build_loader(dataset, n, train=False, workers=0, pin_memory=False)))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_training_step_learns_without_host_sync(drinks, dtype):
    if dtype == torch.bfloat16 and not model_utils.cuda_has_bf16(CUDA):
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


@needs_cuda
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


@needs_cuda
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


@needs_cuda
def test_benchmark_on_cuda_reports_plausible_fields(drinks, capsys):
    args = benchmark.get_args_parser().parse_args([
        "--height", "128", "--width", "160", "--batch-size", "4", "--steps", "5", "--warmup", "2", "--device", "cuda",
        "--data-path", str(drinks), "--workers", "0", "--data-images", "8", "--json"])
    r = benchmark.main(args)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == r
    for key in ("train_img_s", "infer_img_s", "baseline_train_img_s", "baseline_infer_img_s", "infer_eager_img_s",
                "gflops_per_img", "mfu", "peak_bf16_gflops", "data_img_s", "peak_mem_mb"):
        assert isinstance(r[key], (int, float)) and r[key] > 0, key
    assert 0 < r["mfu"] <= 1 and 0 < r["infer_mfu"] <= 1 and 0 < r["baseline_mfu_fp32"] <= 1
    assert r["device"].startswith("cuda") and r["onnx_infer_img_s"] is None  # onnxruntime is timed on CPUs only
    assert r["infer_compile"] is False  # the GPU default: one compile at most
    by_path = r["peak_mem_mb_by_path"]  # each measurement's own peak, not the process's
    assert set(by_path) == {"baseline_train_img_s", "baseline_infer_img_s", "fp32_train_img_s", "fp32_infer_img_s",
                            "train_img_s", "infer_eager_img_s"}
    assert all(v > 0 for v in by_path.values())
    assert by_path["fp32_train_img_s"] > by_path["infer_eager_img_s"]  # training keeps activations for backward
    assert r["peak_mem_mb"] == pytest.approx(by_path["train_img_s"], abs=0.1)


@needs_cuda
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


@needs_cuda
def test_reduce_overhead_compile_cache_and_save_every_on_cuda(tmp_path, drinks, monkeypatch, capsys):
    """CUDA graphs (--compile-mode reduce-overhead) over three epochs with data on the device (the CUDA default,
    recorded as such), last.pt every second epoch and at the end, and the compile cache written then read."""
    saved = []
    real_save_job = train.save_job
    monkeypatch.setattr(train, "save_job", lambda state, best=None, last=None: (saved.append(last is not None),
                                                                                 real_save_job(state, best, last))[1])
    cache = tmp_path / "compile.bin"
    flags = ("--limit", 16, "--epochs", 3, "--workers", 0, "--no-test", "--compile", "--compile-mode",
             "reduce-overhead", "--compile-cache", cache, "--save-every", 2)
    train.main(_train_args(tmp_path, drinks, *flags))
    run = tmp_path / "w" / "run"
    assert json.loads((run / "config.json").read_text())["data_on_device"] is True
    assert saved[-2:] == [True, True] and saved[0] is False  # epochs 2 and 3 (the last) kept last.pt
    assert load_checkpoint(run / "last.pt")["epoch"] == 3
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3] and all(r["train_loss"] == r["train_loss"] for r in lines)
    if hasattr(torch.compiler, "save_cache_artifacts"):  # torch >= 2.7
        assert cache.is_file() and cache.stat().st_size > 0
        capsys.readouterr()
        train.main(_train_args(tmp_path, drinks, *flags[:-2], "--run-name", "again"))
        assert f"loaded the compile cache {cache}" in capsys.readouterr().out


@needs_cuda
def test_the_loader_path_on_cuda(tmp_path, drinks):
    """--no-data-on-device: pinned memory and worker processes feed the GPU, and config.json says so."""
    train.main(_train_args(tmp_path, drinks, "--limit", 16, "--epochs", 1, "--workers", 2, "--no-test",
                           "--no-data-on-device"))
    run = tmp_path / "w" / "run"
    assert json.loads((run / "config.json").read_text())["data_on_device"] is False
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


@needs_cuda
def test_tensorboard_on_cuda_writes_one_log(tmp_path, drinks):
    """The figures written in the background on CUDA go into the one event file, before the log closes."""
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed on this machine")
    train.main(_train_args(tmp_path, drinks, "--limit", 16, "--epochs", 2, "--workers", 0, "--no-test",
                           "--tensorboard"))
    events = list((tmp_path / "w" / "run" / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


@needs_cuda
def test_benchmark_profile_and_epoch_on_cuda(drinks):
    """--profile splits the CUDA kernels' time by layer (eager) or by category alone (compiled); --epoch times
    train.py's own epochs after the parent gave its memory back."""
    common = ["--height", "128", "--width", "160", "--batch-size", "4", "--steps", "3", "--warmup", "2",
              "--device", "cuda", "--data-path", str(drinks), "--workers", "0", "--data-images", "8", "--json",
              "--no-onnx", "--profile"]
    r = benchmark.main(benchmark.get_args_parser().parse_args(
        [*common, "--epoch", "--epoch-count", "2", "--epoch-limit", "16"]))
    groups = {row["group"] for row in r["profile"]["rows"]}
    assert {"stem", "stage1", "stage3", "up", "optimizer"} <= groups
    assert r["profile"]["source"] == "CUDA kernels' device time" and r["profile"]["idle_ms"] >= 0
    assert 0 < r["profile"]["busy_ms"] <= r["profile"]["step_ms"] * 1.05
    assert r["epochs_timed"] == 2 and r["epoch_s"] > 0
    compiled = benchmark.main(benchmark.get_args_parser().parse_args([*common, "--compile"]))
    assert {row["group"] for row in compiled["profile"]["rows"]} <= {COMPILED_GROUP, "optimizer"}
