"""seglib/inference.py: test-time augmentation is the mean of the logits of its views (the image, its mirror, the
image at 1.25 and 1.5 times its size), at the input's size, in evaluate.py and in train.py's validation and test
scoring, and evaluate.py prints its cost."""
import json
import types

import pytest
import torch

import evaluate
import train
from fcn import build_fcn
from model_utils import inference_model
from seglib import inference, scoring


@torch.inference_mode()
def test_flip_tta_is_the_mean_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    fast = inference_model(build_fcn(depth=11).eval(), None, channels_last=True)
    x = torch.rand(2, 3, 123, 157).contiguous(memory_format=torch.channels_last)  # odd size: no crop may shift
    plain, mirrored = fast(x), fast(x.flip(-1)).flip(-1)
    got = inference.predict(fast, x, "flip")
    assert got.shape == (2, 4, 123, 157) and got.dtype == torch.float32
    torch.testing.assert_close(got, (plain + mirrored) / 2)
    assert not torch.allclose(plain, mirrored)  # the mirror is a different view, so the mean is not a no-op
    torch.testing.assert_close(inference.predict(fast, x), plain)
    with pytest.raises(ValueError, match="tta must be one of"):
        inference.predict(fast, x, "scale")


@torch.inference_mode()
def test_multiscale_tta_is_the_mean_of_its_parts():
    torch.manual_seed(0)
    fast = inference_model(build_fcn(depth=11).eval(), None, channels_last=True)
    x = torch.rand(2, 3, 64, 80).contiguous(memory_format=torch.channels_last)
    parts = []
    for scale in (1.0, 1.25, 1.5):
        size = (round(64 * scale), round(80 * scale))
        view = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        flipped = inference.predict(fast, view, "flip")  # itself the mean of the view and its mirror
        parts.append(torch.nn.functional.interpolate(flipped, size=(64, 80), mode="bilinear", align_corners=False))
    got = inference.predict(fast, x, "flip+scales")
    assert got.shape == (2, 4, 64, 80)
    torch.testing.assert_close(got, torch.stack(parts).mean(0))
    torch.testing.assert_close(inference.predict(fast, x, "scales"), torch.stack([
        torch.nn.functional.interpolate(fast(torch.nn.functional.interpolate(x, size=s, mode="bilinear")).float(),
                                        size=(64, 80), mode="bilinear") for s in ((64, 80), (80, 100), (96, 120))
    ]).mean(0))
    assert not torch.allclose(parts[0], parts[2], atol=1e-3)  # the scales are different views
    assert inference.tta_cost("flip+scales") == pytest.approx(2 * (1 + 1.5625 + 2.25))
    assert inference.tta_cost("none") == 1 and inference.tta_cost("flip") == 2


def test_train_validates_and_tests_with_the_tta_asked(tmp_path, drinks, monkeypatch, capsys):
    seen = []
    real_predict = inference.predict

    def recording_predict(fast, x, tta="none"):
        seen.append(tta)
        return real_predict(fast, x, tta)

    monkeypatch.setattr(inference, "predict", recording_predict)
    train.main(train.get_args_parser().parse_args([
        "--data-path", str(drinks), "--output-dir", str(tmp_path / "w"), "--figures-dir", str(tmp_path / "f"),
        "--run-name", "tta", "--workers", "0", "--height", "32", "--width", "48", "--limit", "8", "--epochs", "1",
        "--val-fraction", "0.01",
        "--tta", "flip+scales"]))
    assert seen and set(seen) == {"flip+scales"}  # every validation and test batch
    run = tmp_path / "w" / "tta"
    assert json.loads((run / "test_metrics.json").read_text())["tta"] == "flip+scales"
    assert json.loads((run / "config.json").read_text())["tta"] == "flip+scales"

    seen.clear()
    clock = iter([10.0, 13.0])  # the scoring loop takes 3 s on this clock: 500 ms for each of 6 images
    monkeypatch.setattr(scoring, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    metrics = evaluate.main(evaluate.get_args_parser().parse_args([
        "--weights", str(run / "best.pt"), "--data-path", str(drinks), "--figures", "0", "--workers", "0",
        "--tta", "flip", "--limit", "6"]))
    assert metrics["tta"] == "flip" and metrics["n_images"] == 6 and set(seen) == {"flip"}
    assert metrics["ms_per_image"] == 500.0
    assert "tta flip: 2 views, 2.00 forward passes at 32x48 per image" in capsys.readouterr().out
