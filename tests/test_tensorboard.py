"""train.py --tensorboard: the event file read back with TensorBoard's own reader holds metrics.jsonl's numbers,
each step once, also after a run is resumed from an older last.pt (as after a kill -9 past its checkpoint).
Training without the package installed is tested in test_train.py."""
import json
import shutil

import pytest

import train
from seglib.engine import CHECK_EVERY

COMMON = ["--height", 32, "--width", 40, "--limit", 24, "--val-fraction", 0.005, "--deterministic", "--no-test",
          "--batch-size", 2, "--device", "cpu", "--workers", 0, "--tensorboard"]


def _run(tmp_path, drinks, *extra):
    argv = ["--data-path", str(drinks), "--output-dir", str(tmp_path / "weights"), "--figures-dir",
            str(tmp_path / "figures"), "--run-name", "run"] + [str(e) for e in [*COMMON, *extra]]
    return train.main(train.get_args_parser().parse_args(argv))


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_event_file_holds_the_metrics_once_each_after_a_resume(tmp_path, drinks):
    run = tmp_path / "weights" / "run"
    _run(tmp_path, drinks, "--epochs", 1)
    epoch_one = tmp_path / "epoch1.pt"
    shutil.copy(run / "last.pt", epoch_one)
    _run(tmp_path, drinks, "--epochs", 2, "--resume")
    shutil.copy(epoch_one, run / "last.pt")  # epoch 2 was logged, then its checkpoint lost: it runs again
    _run(tmp_path, drinks, "--epochs", 2, "--resume")

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    acc = _events(run / "tb")
    steps = 24 // 2  # --limit 24 training images in batches of 2
    for tag, key in (("val/miou_per_image", "miou_per_image"), ("val/miou", "miou")):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [steps, 2 * steps]  # not three: the repeated epoch 2 replaced the first
        assert [e.value for e in events] == pytest.approx([r["val"][key] for r in rows], abs=1e-6)
    water = acc.Scalars("val_iou/Water")
    assert [e.value for e in water] == pytest.approx([r["val_iou_per_class"][1] for r in rows], abs=1e-6)
    img_s = [e.value for e in acc.Scalars("epoch/img_s")]
    assert img_s == pytest.approx([r["train_images"] / r["seconds"] for r in rows], rel=1e-5)
    loss_steps = [e.step for e in acc.Scalars("train/loss")]
    assert loss_steps == sorted(set(loss_steps))  # each step once, in order
    assert set(loss_steps) == {s for e in range(2) for s in (e * steps + CHECK_EVERY, (e + 1) * steps)}
    assert acc.Scalars("train/lr")[0].value == pytest.approx(1e-3)
    images = acc.Images("val/predictions")
    assert [e.step for e in images] == [steps, 2 * steps] and images[0].width > 0


def test_the_last_figure_written_in_the_background_goes_into_the_one_log(tmp_path, drinks, monkeypatch):
    """With checkpoints and figures written from a thread (as on a GPU), the log stays open until the writer's
    last job, the last epoch's figure, is done: one event file, holding both epochs' figures."""
    import time

    from seglib import tensorboard_log

    grid = tensorboard_log.prediction_grid
    monkeypatch.setattr(tensorboard_log, "prediction_grid", lambda *a, **k: (time.sleep(1.0), grid(*a, **k))[1])
    _run(tmp_path, drinks, "--epochs", 2, "--save-in-background")
    log = tmp_path / "weights" / "run" / "tb"
    assert len(list(log.glob("events.out.tfevents.*"))) == 1
    steps = 24 // 2
    assert [e.step for e in _events(log).Images("val/predictions")] == [steps, 2 * steps]
