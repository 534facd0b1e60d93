"""export.py and the ONNX path: onnxruntime agrees with PyTorch, evaluate.py scores a .onnx as its .pt, the
metadata round-trips, and bad input gives one-line errors and leaves no file behind."""
import inspect
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import data_generator as dg
import evaluate
import export
from seglib.checkpoints import load_checkpoint
from seglib.files import CheckpointError, ExportError, read_image
from seglib.onnx_model import CONFIG_KEY, OnnxModel, read_metadata
from seglib.registry import model_from_checkpoint

ROOT = dg.Path(dg.__file__).parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_checkpoint, drinks):
    """The tiny trained checkpoint and its export (checked on 4 real test images)."""
    onnx_path = tmp_path_factory.mktemp("export") / "model.onnx"
    result = export.main(_export_args(tiny_checkpoint, onnx_path, drinks))
    return tiny_checkpoint, onnx_path, result


def _export_args(weights, output, drinks, *extra):
    return export.get_args_parser().parse_args(
        ["--weights", str(weights), "--output", str(output), "--data-path", str(drinks), *map(str, extra)])


def _test_images(drinks, n):
    ann = dg.load_annotations(drinks, "test")
    return [torch.from_numpy(read_image(ann.root / name)).permute(2, 0, 1) for name in ann.filenames[:n]]


def test_export_checks_agreement_and_writes_only_the_file(trained):
    weights, onnx_path, result = trained
    ckpt = load_checkpoint(weights)
    images, _ = export.check_images(ROOT / "no-such-folder", ckpt["config"], 4)  # any images: only the scale
    with torch.no_grad():
        scale = model_from_checkpoint(ckpt, weights).eval()(images).abs().max().item()
    # float32 rounding scales with the logits: a one-epoch model's reach 1e5 (BatchNorm statistics barely moved)
    assert result["argmax_agreement"] >= 0.999 and result["max_abs_logit_diff"] < 1e-5 * scale
    assert onnx_path.is_file() and not list(onnx_path.parent.glob(".*.tmp"))
    onnx.checker.check_model(str(onnx_path))


@pytest.mark.parametrize("size", [(60, 80), (123, 157)])
@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_pytorch_float32(trained, drinks, size, batch):
    weights, onnx_path, _ = trained
    ckpt = load_checkpoint(weights)
    model = model_from_checkpoint(ckpt, weights).eval()
    images = torch.stack([TF.resize(im, list(size), antialias=True) for im in _test_images(drinks, batch)])
    x = images.float() / 255  # (B, 3, H, W) in [0, 1], as to_input gives
    with torch.no_grad():
        reference = model(x)
    session = OnnxModel(onnx_path)
    logits, labels = session.session.run(None, {"images": x.numpy()})
    assert logits.shape == (batch, 4, *size) and labels.shape == (batch, *size) and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, logits.argmax(1))
    # float32 rounding scales with the logits: a one-epoch model's reach 1e5 (BatchNorm statistics barely moved)
    torch.testing.assert_close(torch.from_numpy(logits), reference, atol=1e-5 * reference.abs().max().item(),
                               rtol=1e-3)
    assert (labels == reference.argmax(1).numpy()).mean() >= 0.999


def test_metadata_round_trips(trained):
    weights, onnx_path, _ = trained
    ckpt = load_checkpoint(weights)
    config, split = read_metadata(onnx_path)
    assert config == ckpt["config"]
    assert split == {"val_fraction": 0.01, "seed": 0}  # the split seed: 0 whatever the run's --seed (3)
    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    assert json.loads(props["class_names"]) == ["background", "Water", "Soda", "Juice"]
    assert (props["input_height"], props["input_width"]) == ("60", "80")
    assert props["source"] == "best.pt"


def test_evaluate_scores_the_onnx_file_as_the_checkpoint(trained, drinks, tmp_path):
    weights, onnx_path, _ = trained
    common = ["--data-path", str(drinks), "--workers", "0", "--batch-size", "5"]
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--weights", str(weights), "--no-amp", "--figures", "0", "--json", str(tmp_path / "pt.json"), *common]))
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--weights", str(onnx_path), "--json", str(tmp_path / "onnx.json"), "--figures", "2", "--figures-dir",
         str(tmp_path / "figs"), "--save-predictions", str(tmp_path / "preds"), *common]))
    pt, ox = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("pt", "onnx"))
    assert ox["n_images"] == pt["n_images"] == 51
    for key in ("miou", "miou_per_image", "pixel_accuracy"):
        assert ox[key] == pytest.approx(pt[key], abs=0.002), key
    assert {p.name for p in (tmp_path / "figs").iterdir()} == {"samples.png", "worst.png", "confusion_matrix.png"}
    assert len(list((tmp_path / "preds").glob("*.png"))) == 51

    # train/val splits come back from the metadata's fraction and seed: the 10 held-out images
    val = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--weights", str(onnx_path), "--split", "val", "--figures", "0", *common]))
    assert val["n_images"] == 10

    written = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--weights", str(onnx_path), "--image-file", str(drinks / "0010000.jpg"), "--output-dir",
         str(tmp_path / "files")]))
    mask = np.asarray(Image.open(written[0]))
    assert mask.shape == (480, 640) and mask.max() < 4


def test_missing_and_foreign_checkpoints_are_refused(tmp_path, drinks):
    with pytest.raises(CheckpointError, match="not found"):
        export.main(_export_args(tmp_path / "nope.pt", tmp_path / "m.onnx", drinks))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        export.main(_export_args(tmp_path / "foreign.pt", tmp_path / "m.onnx", drinks))
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".*.tmp"))


def test_foreign_and_broken_onnx_files_are_refused(tmp_path, drinks):
    conv = torch.nn.Conv2d(3, 4, 1).eval()
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    torch.onnx.export(conv, (torch.rand(1, 3, 8, 8),), str(tmp_path / "other.onnx"), input_names=["images"], **legacy)
    args = ["--data-path", str(drinks), "--workers", "0", "--figures", "0"]
    with pytest.raises(CheckpointError, match=f"not an ONNX model of this project .*{CONFIG_KEY}"):
        evaluate.main(evaluate.get_args_parser().parse_args(["--weights", str(tmp_path / "other.onnx"), *args]))
    (tmp_path / "broken.onnx").write_bytes(b"\x00not onnx at all\xff" * 10)
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        evaluate.main(evaluate.get_args_parser().parse_args(["--weights", str(tmp_path / "broken.onnx"), *args]))
    with pytest.raises(CheckpointError, match="ONNX model not found"):
        evaluate.main(evaluate.get_args_parser().parse_args(["--weights", str(tmp_path / "none.onnx"), *args]))


def test_unwritable_output_and_failed_check_leave_nothing(trained, tmp_path, drinks, monkeypatch):
    weights, _, _ = trained
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ExportError, match="cannot write"):
        export.main(_export_args(weights, tmp_path / "a_file" / "m.onnx", drinks))
    # an export that disagrees with PyTorch: the check fails and no file is left, not even the temporary one
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(export, "compare", lambda model, onnx_model, images: (3.0, 0.5))
    with pytest.raises(ExportError, match="agrees with PyTorch on only 50.0000% of pixels"):
        export.main(_export_args(weights, tmp_path / "out" / "m.onnx", drinks))
    monkeypatch.undo()
    assert list((tmp_path / "out").iterdir()) == []
    # without a check no dataset is needed
    export.main(_export_args(weights, tmp_path / "out" / "m.onnx", tmp_path / "no-data", "--check-images", 0))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["m.onnx"]


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "export.py", "--weights", str(tmp_path / "nope.pt"), "--output",
                           str(tmp_path / "m.onnx")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.pt'}: checkpoint not found"]
    assert not (tmp_path / "m.onnx").exists()


def test_file_has_opset_17_and_every_batchnorm_after_a_conv_folded(trained):
    """The graph's BatchNormalization nodes are those left unfolded in PyTorch (the pre-activation ones after a
    residual sum), not the model's full count."""
    weights, onnx_path, _ = trained
    graph = onnx.load(str(onnx_path))
    assert {o.domain: o.version for o in graph.opset_import}.get("", None) == 17
    in_file = sum(n.op_type == "BatchNormalization" for n in graph.graph.node)
    model = model_from_checkpoint(load_checkpoint(weights), weights).eval()
    everything = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    left = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.fuse_bn_().modules())
    assert in_file == left < everything
