"""seglib/inference.py: flip test-time augmentation is the mean of the logits of an image and of its mirror, at
the input's size, in evaluate.py and in train.py's validation and test scoring."""
import json

import pytest
import torch

import evaluate
import train
from fcn import build_fcn
from model_utils import inference_model
from seglib import inference


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


def test_train_validates_and_tests_with_flip_tta(tmp_path, drinks, monkeypatch):
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
        "--tta", "flip"]))
    assert seen and set(seen) == {"flip"}  # every validation and test batch
    run = tmp_path / "w" / "tta"
    assert json.loads((run / "test_metrics.json").read_text())["tta"] == "flip"
    assert json.loads((run / "config.json").read_text())["tta"] == "flip"

    seen.clear()
    metrics = evaluate.main(evaluate.get_args_parser().parse_args([
        "--weights", str(run / "best.pt"), "--data-path", str(drinks), "--figures", "0", "--workers", "0",
        "--tta", "flip", "--limit", "6"]))
    assert metrics["tta"] == "flip" and metrics["n_images"] == 6 and set(seen) == {"flip"}
