"""--ema: the average's update rule (BatchNorm statistics included), its use for validation, best.pt and the
test score, and its place in the checkpoint (exact resume is in test_train.py)."""
import json

import pytest
import torch
from torch import nn

import evaluate
import train
from seglib import scoring
from seglib.checkpoints import load_checkpoint
from seglib.engine import ModelEMA
from seglib.registry import model_from_checkpoint


def _tiny():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def test_update_averages_parameters_and_batchnorm_statistics():
    torch.manual_seed(0)
    model = _tiny()
    ema = ModelEMA(model, decay=0.9)
    assert [ema.current_decay() for _ in range(1)] == [pytest.approx(0.1)]  # (1 + 0) / (10 + 0): warmup
    ema.updates = 1000  # past the warmup: the decay itself
    assert ema.current_decay() == 0.9
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    model.train()(torch.rand(2, 3, 8, 8))  # moves the running statistics and the batch counter
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    after, live = ema.module.state_dict(), model.state_dict()
    for key in ("0.weight", "0.bias", "1.running_mean", "1.running_var", "1.weight"):
        torch.testing.assert_close(after[key], 0.9 * before[key] + 0.1 * live[key])
    assert int(after["1.num_batches_tracked"]) == 1  # integers are copied
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    assert ema.updates == 1001


def test_resume_state_round_trips():
    model = _tiny()
    ema = ModelEMA(model, 0.99)
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.mul_(1.1)
        ema.update(model)
    other = ModelEMA(_tiny(), 0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 3
    for k, v in ema.module.state_dict().items():
        assert torch.equal(v, other.module.state_dict()[k])


def test_validation_best_and_test_use_the_ema_weights(tmp_path, drinks):
    train.main(train.get_args_parser().parse_args([
        "--data-path", str(drinks), "--output-dir", str(tmp_path / "w"), "--figures-dir", str(tmp_path / "f"),
        "--run-name", "ema", "--workers", "0", "--height", "32", "--width", "48", "--limit", "16", "--epochs", "1",
        "--val-fraction", "0.02", "--ema", "0.5", "--no-amp"]))
    run = tmp_path / "w" / "ema"
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["ema"]["updates"] == 4 and ckpt["ema"]["decay"] == 0.5
    live, averaged = ckpt["model"], ckpt["ema"]["model"]
    assert not torch.equal(live["classifier.weight"], averaged["classifier.weight"])
    # the checkpoint loads as its EMA weights, and those are the weights the run validated and tested
    loaded = model_from_checkpoint(ckpt).state_dict()
    assert all(torch.equal(loaded[k], averaged[k]) for k in averaged)
    validated = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["val"]
    def score(weights, split, ema=True):  # as train.py scores: float32 here, channels_last
        return scoring.evaluate_checkpoint(weights, drinks, split, batch_size=4, workers=0, device="cpu", amp=False,
                                            channels_last=True, quiet=True, ema=ema)

    rescored = score(run / "best.pt", "val")
    assert rescored["n_images"] == validated["n_images"] == 20
    assert rescored["miou_per_image"] == pytest.approx(validated["miou_per_image"], abs=1e-9)
    tested = json.loads((run / "test_metrics.json").read_text())
    assert tested["miou"] == pytest.approx(score(run / "best.pt", "test")["miou"], abs=1e-9)
    # the live weights score otherwise, so the equalities above say which weights were scored
    torch.save({k: v for k, v in ckpt.items() if k != "ema"}, tmp_path / "live.pt")
    live_score = score(tmp_path / "live.pt", "val")
    assert abs(live_score["miou_per_image"] - validated["miou_per_image"]) > 1e-4
    assert rescored["ema"] is True and live_score["ema"] is False
    # evaluate.py --no-ema scores the trained weights of the EMA checkpoint: the live ones
    args = evaluate.get_args_parser().parse_args([
        "--weights", str(run / "best.pt"), "--data-path", str(drinks), "--split", "val", "--no-ema", "--no-amp",
        "--figures", "0", "--workers", "0", "--json", str(tmp_path / "no-ema.json")])
    evaluate.main(args)
    no_ema = json.loads((tmp_path / "no-ema.json").read_text())
    assert no_ema["ema"] is False and no_ema["miou_per_image"] == pytest.approx(live_score["miou_per_image"], abs=1e-9)


@pytest.mark.parametrize("value", ["1.5", "1", "-0.1", "x"])
def test_ema_decay_out_of_range_is_refused_with_the_flag_named(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.get_args_parser().parse_args(["--ema", value])
    assert exit_info.value.code == 2 and "--ema" in capsys.readouterr().err
