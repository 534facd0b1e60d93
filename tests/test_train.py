"""train.py and evaluate.py end to end on the real data at tiny sizes: resume, NaN stop, Ctrl-C, DDP."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data_generator as dg
import evaluate
import train
from seglib import engine, inference, scoring
from seglib.checkpoints import load_checkpoint
from seglib.files import TrainingError, UsageError

ROOT = dg.Path(dg.__file__).parent


def _args(tmp_path, drinks, *extra):
    base = ["--data-path", str(drinks), "--output-dir", str(tmp_path / "weights"), "--figures-dir",
            str(tmp_path / "figures"), "--run-name", "run", "--workers", "0"]
    return train.get_args_parser().parse_args(base + [str(e) for e in extra])


def test_tiny_run_resume_and_evaluate(tmp_path, drinks, monkeypatch):
    train.main(_args(tmp_path, drinks, "--height", 60, "--width", 80, "--limit", 32, "--epochs", 1, "--workers", 2,
                     "--no-test", "--val-fraction", 0.01))
    run = tmp_path / "weights" / "run"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    train.main(_args(tmp_path, drinks, "--height", 60, "--width", 80, "--limit", 32, "--epochs", 2, "--resume",
                     "--val-fraction", 0.01, "--no-test"))  # the run's own test scoring: test_inference.py
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert {"train_loss", "lr", "seconds", "val"} <= set(lines[0]) and lines[1]["val"]["n_images"] == 10
    assert (tmp_path / "figures" / "run" / "curves.png").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 2 and config["resume"] is True
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["config"]["height"] == 60
    # best.pt is the best validation epoch, and the resumed run kept the first run's score in the running best
    scores = [r["val"]["miou_per_image"] for r in lines]
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] == 1 + scores.index(max(scores))
    assert best["best_miou"] == ckpt["best_miou"] == max(scores)
    # best.pt is for scoring: no optimizer, scaler, RNG or loss state, a third of last.pt
    assert not {"optimizer", "scaler", "rng", "loss_state"} & set(best) and {"model", "config", "args"} <= set(best)
    assert (run / "best.pt").stat().st_size < (run / "last.pt").stat().st_size / 2.5
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [1e-3, 1e-3]

    preds, figs = tmp_path / "preds", tmp_path / "evalfigs"
    args = evaluate.get_args_parser().parse_args([
        "--weights", str(run / "best.pt"), "--data-path", str(drinks), "--split", "test", "--json",
        str(tmp_path / "m.json"), "--save-predictions", str(preds), "--figures", "3", "--figures-dir", str(figs),
        "--workers", "0"])
    evaluate.main(args)
    assert (figs / "samples.png").is_file() and (figs / "confusion_matrix.png").is_file()
    reported = json.loads((tmp_path / "m.json").read_text())
    assert {"miou", "miou_per_image", "pixel_accuracy", "pixel_accuracy_per_image", "mean_class_accuracy",
            "per_class", "n_images"} <= set(reported)

    # score the saved PNGs against the polygons, independently of SegmentationMetrics
    ann = dg.load_annotations(drinks, "test")
    conf = np.zeros((4, 4), dtype=np.int64)
    per_image = []
    for i, name in enumerate(ann.filenames):
        png = Image.open(preds / (dg.Path(name).stem + ".png"))
        assert png.mode == "P" and png.size == (640, 480)
        pred, gt = np.asarray(png).astype(np.int64), ann.mask(i).astype(np.int64)
        c = np.bincount(gt.ravel() * 4 + pred.ravel(), minlength=16).reshape(4, 4)
        conf += c
        tp, union = np.diag(c), c.sum(0) + c.sum(1) - np.diag(c)
        present = c.sum(1) > 0
        per_image.append((tp[present] / union[present]).mean())
    tp, union = np.diag(conf), conf.sum(0) + conf.sum(1) - np.diag(conf)
    assert reported["miou"] == pytest.approx((tp[union > 0] / union[union > 0]).mean(), abs=1e-9)
    assert reported["miou_per_image"] == pytest.approx(np.mean(per_image), abs=1e-9)
    # and the dataset-wide mIoU and per-class IoU against torchmetrics' Jaccard index on the same PNGs
    from torchmetrics.classification import MulticlassJaccardIndex

    jaccard = MulticlassJaccardIndex(num_classes=4, average="none")
    for i, name in enumerate(ann.filenames):
        pred = np.asarray(Image.open(preds / (dg.Path(name).stem + ".png")))
        jaccard.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(ann.mask(i).astype(np.int64)))
    per_class = jaccard.compute()  # every class is in the test split's ground truth, so all four count
    assert [r["iou"] for r in reported["per_class"]] == pytest.approx(per_class.tolist(), abs=1e-6)
    assert reported["miou"] == pytest.approx(per_class.mean().item(), abs=1e-6)
    assert reported["pixel_accuracy"] == pytest.approx(tp.sum() / conf.sum(), abs=1e-12)
    assert reported["n_images"] == 51

    # --compile asks for the frozen graph (test_model checks that graph against eager; compiling this 56-layer
    # model here would cost half a minute), and the scores stay those of the eager model
    requested = []

    def inference_model(model, dtype=None, channels_last=True, compile=False):
        requested.append(compile)
        return real_inference_model(model, dtype, channels_last, False)

    real_inference_model = inference.inference_model
    monkeypatch.setattr(inference, "inference_model", inference_model)
    evaluate.main(evaluate.get_args_parser().parse_args([
        "--weights", str(run / "best.pt"), "--data-path", str(drinks), "--json", str(tmp_path / "c.json"),
        "--figures", "0", "--workers", "0", "--compile", "--limit", "4"]))
    monkeypatch.undo()
    assert requested == [True] and json.loads((tmp_path / "c.json").read_text())["n_images"] == 4

    out = tmp_path / "files"
    evaluate.main(evaluate.get_args_parser().parse_args([
        "--weights", str(run / "best.pt"), "--image-file", str(drinks / "0010000.jpg"), "--output-dir", str(out)]))
    assert Image.open(out / "0010000-mask.png").size == (640, 480) and (out / "0010000-overlay.png").is_file()


def _weights(path):
    return load_checkpoint(path)["model"]


@pytest.mark.parametrize("schedule", [["--lr-schedule", "book"],
                                      ["--lr-schedule", "cosine", "--warmup-epochs", 0.5, "--ema", 0.9]],
                         ids=["book", "cosine-warmup-ema"])
def test_exact_resume_also_after_ctrl_c(tmp_path, drinks, monkeypatch, schedule, ctrl_c_at_step):
    """Resumed runs end with the uninterrupted run's weights, bit for bit. With cosine the rate changes every
    step, so a resume mid-epoch must set it again exactly, and the EMA must go on from its saved state. (Resuming
    with another --epochs changes the scaled, cosine and poly schedules by design, so the epoch-boundary resume
    runs with the book's.)"""
    # bitwise equality holds on the CPU; on a GPU some backward kernels (interpolate, NLL) are not deterministic
    common = ["--height", 32, "--width", 40, "--limit", 24, "--val-fraction", 0.005, "--deterministic", "--no-test",
              "--batch-size", 4, "--device", "cpu", *schedule]
    full, part, stopped = tmp_path / "full", tmp_path / "part", tmp_path / "stopped"
    train.main(_args(full, drinks, *common, "--epochs", 2))
    resumed = [stopped]
    if schedule[1] == "book":
        train.main(_args(part, drinks, *common, "--epochs", 1, "--workers", 2))
        train.main(_args(part, drinks, *common, "--epochs", 2, "--resume"))
        resumed.append(part)

    monkeypatch.setattr(train, "build_criterion", lambda *a: ctrl_c_at_step(9))  # epoch 2, step 3 of 6
    assert train.main(_args(stopped, drinks, *common, "--epochs", 2)) is None
    ckpt = load_checkpoint(stopped / "weights" / "run" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 3)
    monkeypatch.undo()
    train.main(_args(stopped, drinks, *common, "--epochs", 2, "--resume"))

    ref = load_checkpoint(full / "weights" / "run" / "last.pt")
    with_ema = "--ema" in schedule
    assert ("ema" in ref) == with_ema
    for other in resumed:
        got = load_checkpoint(other / "weights" / "run" / "last.pt")
        assert ("ema" in got) == with_ema
        pairs = [("model", ref["model"], got["model"])]
        if with_ema:
            pairs.append(("ema", ref["ema"]["model"], got["ema"]["model"]))
            assert got["ema"]["updates"] == ref["ema"]["updates"] == 12
        for name, a, b in pairs:
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
                f"{other.name}'s {name} differs from the full run"
    # the last step's rate (step 11 of 12; cosine: 3 warmup steps, then 8 of the 9 cosine steps done)
    rates = [load_checkpoint(d / "weights" / "run" / "last.pt")["optimizer"]["param_groups"][0]["lr"]
             for d in [full, *resumed]]
    expected = 1e-3 if schedule[1] == "book" else 1e-3 * 0.5 * (1 + np.cos(np.pi * 8 / 9))
    assert rates == pytest.approx([expected] * len(rates))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, drinks, monkeypatch):
    calls = {"n": 0}

    def criterion(logits, target):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(logits, target)
        return loss * float("nan") if calls["n"] > 4 else loss  # epoch 1 has 4 steps

    monkeypatch.setattr(train, "build_criterion", lambda *a: criterion)
    with pytest.raises(TrainingError, match=r"loss is not finite at epoch 2 step .*last.pt keeps the last good"):
        train.main(_args(tmp_path, drinks, "--height", 32, "--width", 40, "--limit", 16, "--epochs", 3,
                         "--val-fraction", 0.005))
    ckpt = load_checkpoint(tmp_path / "weights" / "run" / "last.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_refuses_to_overwrite_a_run_without_resume(tmp_path, drinks):
    common = ("--height", 32, "--width", 40, "--limit", 8, "--epochs", 1, "--val-fraction", 0.005)
    train.main(_args(tmp_path, drinks, *common, "--no-test"))
    with pytest.raises(TrainingError, match="last.pt exists: pass --resume"):
        train.main(_args(tmp_path, drinks, *common))


@pytest.mark.parametrize("model", ["fcn_resnet56v2", "lraspp_mobilenet_v3_large"])
def test_two_process_gloo_run_matches_single_process_evaluation(tmp_path, drinks, model):
    """5 validation images over 2 ranks: padding would count one twice (pytorch/vision#4559). DDP wraps any
    registered model the same way; a torchvision one shows no parameter goes unused (no auxiliary head)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--data-path", str(drinks), "--output-dir", str(tmp_path / "w"), "--figures-dir", str(tmp_path / "f"),
           "--run-name", "ddp", "--height", "32", "--width", "40", "--limit", "16", "--val-fraction", "0.005",
           "--epochs", "1", "--workers", "0", "--no-test", "--no-amp", "--batch-size", "2", "--model", model,
           "--device", "cpu"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    reported = json.loads((tmp_path / "w" / "ddp" / "metrics.jsonl").read_text().splitlines()[-1])["val"]
    assert reported["n_images"] == 5
    single = scoring.evaluate_checkpoint(tmp_path / "w" / "ddp" / "last.pt", drinks, "val", batch_size=2,
                                          workers=0, device="cpu", amp=False, quiet=True)
    assert single["n_images"] == 5
    for key in ("miou", "miou_per_image", "pixel_accuracy", "pixel_accuracy_per_image", "mean_class_accuracy"):
        assert reported[key] == pytest.approx(single[key], abs=1e-6), key


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, drinks):
    """Ctrl-C seen by one rank only (in a terminal the ranks see it at different steps): every rank stops at the
    next step they check together, last.pt is saved and both exit 0. A rank that went to the stop's all_reduce
    alone would meet the other's gradient all_reduce there and hang."""
    run = tmp_path / "w" / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    cmd = [sys.executable, "train.py", "--data-path", str(drinks), "--output-dir", str(tmp_path / "w"),
           "--figures-dir", str(tmp_path / "f"), "--run-name", "ddp", "--height", "32", "--width", "40",
           "--limit", "48", "--val-fraction", "0.005", "--epochs", "100", "--workers", "0", "--no-test", "--no-amp",
           "--batch-size", "2", "--device", "cpu"]  # 12 steps an epoch: checks at step 10 and at the end
    ranks = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.jsonl").is_file() and time.monotonic() < deadline:
            assert all(p.poll() is None for p in ranks), ranks[0].communicate()[1][-3000:]
            time.sleep(0.2)
        time.sleep(0.5)  # into the second epoch's steps
        ranks[1].send_signal(signal.SIGINT)
        outs = [p.communicate(timeout=180) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    assert [p.returncode for p in ranks] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["epoch"] >= 1 and ckpt["step"] in (engine.CHECK_EVERY, 12)
    assert "continue with --resume" in outs[0][0]


class _Recorded(Exception):
    """Stops train.main once the datasets' arguments are recorded."""


@pytest.mark.parametrize("argv, mode", [([], "full"), (["--augment", "flip"], "flip"), (["--no-augment"], "none")])
def test_augment_flag_reaches_the_training_dataset(tmp_path, drinks, monkeypatch, argv, mode):
    seen = {}

    def make_dataset(data_path, split, height, width, augment="full", *args, **kwargs):
        seen[split] = augment
        if split == "val":
            raise _Recorded
        return "dataset", ["background"]

    monkeypatch.setattr(train, "make_dataset", make_dataset)
    with pytest.raises(_Recorded):
        train.main(_args(tmp_path, drinks, "--device", "cpu", *argv))
    assert seen["train"] == mode


def test_cpu_start_message_gives_readmes_cpu_command():
    """A CPU run's start message gives the exact command of README's CPU recipe (test_own_data sees it printed)."""
    readme = (ROOT / "README.md").read_text()
    assert f"\n{train.CPU_COMMAND}\n" in readme


def test_training_needs_neither_onnx_nor_onnxruntime_nor_tensorboard(tmp_path, drinks, monkeypatch):
    """Only reading or writing a .onnx file needs onnx and onnxruntime, and only --tensorboard needs tensorboard:
    with the three hidden, the scripts import and a run trains; --tensorboard is then a one-line error."""
    hide = "import sys; sys.modules['onnx'] = sys.modules['onnxruntime'] = sys.modules['tensorboard'] = None; " \
           "import train, evaluate; print(train.get_args_parser().format_help())"
    out = subprocess.run([sys.executable, "-c", hide], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--recipe" in out.stdout, out.stderr[-2000:]
    for name in ("onnx", "onnxruntime", "seglib.onnx_model", "tensorboard"):  # importing any of them now fails
        monkeypatch.setitem(sys.modules, name, None)
    flags = ["--height", 32, "--width", 40, "--limit", 8, "--epochs", 1, "--device", "cpu", "--no-test"]
    train.main(_args(tmp_path, drinks, *flags))
    assert len((tmp_path / "weights" / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (tmp_path / "weights" / "run" / "tb").exists()
    with pytest.raises(UsageError, match=r"^--tensorboard: the tensorboard package is not installed \(pip install"):
        train.main(_args(tmp_path / "again", drinks, *flags, "--tensorboard"))
    assert not (tmp_path / "again").exists()


def test_training_levers_reach_the_run(tmp_path, drinks, monkeypatch, capsys):
    """--progressive trains each epoch at its size, in the order asked, through persistent loader workers, and
    metrics.jsonl records it; --loss, --class-weights and --zero-init-residual reach the criterion and the model."""
    shapes, zeroed = [], []
    real_step, real_zero = engine.train_step, train.zero_init_residual_

    def recording_step(model, criterion, optimizer, scaler, x, target, dtype, loss_fn=None):
        shapes.append((tuple(x.shape[-2:]), tuple(target.shape[-2:]), criterion.loss,
                       criterion.class_weights.tolist()))
        return real_step(model, criterion, optimizer, scaler, x, target, dtype, loss_fn)

    def recording_zero(model):
        zeroed.append(real_zero(model))
        return zeroed[-1]

    monkeypatch.setattr(engine, "train_step", recording_step)
    monkeypatch.setattr(train, "zero_init_residual_", recording_zero)
    train.main(_args(tmp_path, drinks, "--height", 48, "--width", 64, "--depth", 11, "--n-layers", 2, "--limit", 8,
                     "--epochs", 3, "--val-fraction", 0.01, "--no-test", "--workers", 2, "--augment", "flip",
                     "--progressive", "32x40:0.3", "40x48:0.6", "--flips", "alternate", "--loss", "ce+lovasz",
                     "--class-weights", "1,2,3,4", "--zero-init-residual"))
    rows = [json.loads(line) for line in (tmp_path / "weights" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["size"] for r in rows] == [[32, 40], [40, 48], [48, 64]]
    # 2 steps an epoch (a --limit smoke run times no steps for a start-up estimate)
    assert [s[0] for s in shapes] == [(32, 40)] * 2 + [(40, 48)] * 2 + [(48, 64)] * 2
    assert all(s[1] == s[0] and s[2:] == ("ce+lovasz", [1.0, 2.0, 3.0, 4.0]) for s in shapes)
    assert zeroed == [3]  # depth 11: 3 stages of one unit
    out = capsys.readouterr().out
    assert "class weights: background 1.000, Water 2.000, Soda 3.000, Juice 4.000" in out
    # an epoch says how long the rest should take only once every size left has been trained at: here none does
    # before the last (each epoch has its own size), and the last has nothing left
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 3 and not any("min left" in line for line in epoch_lines)


def test_each_epoch_says_how_long_the_rest_should_take(tmp_path, drinks, capsys):
    """At one size every epoch but the last gives the time left, from the epoch just measured."""
    train.main(_args(tmp_path, drinks, "--height", 48, "--width", 64, "--depth", 11, "--n-layers", 2, "--limit", 8,
                     "--epochs", 3, "--val-fraction", 0.01, "--no-test", "--workers", 0))
    epoch_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [("min left" in line) for line in epoch_lines] == [True, True, False]


def test_a_resumed_partial_epoch_gives_no_time_left(tmp_path, drinks, monkeypatch, ctrl_c_at_step, capsys):
    """The epoch a run resumes in took only the steps left of it, so its time is no epoch's: it gives no time
    left, and the next whole epoch does."""
    common = ["--height", 48, "--width", 64, "--depth", 11, "--n-layers", 2, "--limit", 16, "--val-fraction", 0.01,
              "--no-test", "--epochs", 4]  # 3 steps an epoch
    monkeypatch.setattr(train, "build_criterion", lambda *a: ctrl_c_at_step(5))  # epoch 2, step 2 of 3
    assert train.main(_args(tmp_path, drinks, *common)) is None
    monkeypatch.undo()
    capsys.readouterr()
    train.main(_args(tmp_path, drinks, *common, "--resume"))
    epoch_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epoch_lines] == ["epoch 2", "epoch 3", "epoch 4"]
    assert [("min left" in line) for line in epoch_lines] == [False, True, False]


@pytest.mark.parametrize("argv, words", [
    (["--flips", "alternate", "--no-augment"], "--flips alternate: flips need --augment flip or full"),
    (["--progressive", "64x96:0.6", "80x96:0.3"], "--progressive 64x96:0.6 80x96:0.3: the UNTIL fractions must"),
    (["--class-weights", "1,2"], "--class-weights 1.0,2.0: needs one weight per class, 4"),
])
def test_bad_lever_combinations_are_refused(tmp_path, drinks, argv, words):
    with pytest.raises(train.UsageError, match=words.replace("+", r"\+")):
        train.main(_args(tmp_path, drinks, "--limit", 8, "--val-fraction", 0.01, "--height", 32, "--width", 32,
                         *argv))
    assert not (tmp_path / "weights" / "run").exists()
