"""The model registry: every model's output shape and BatchNorm folding, tiny runs of other models evaluated with
no model flags, checkpoints written before the registry, pretrained backbones, and the scripts' --model flag."""
import copy
import dataclasses
import json
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from torchvision.models import mobilenet_v3_large

import benchmark
import evaluate
import export
import model_utils as mu
import train
from fcn import build_fcn
from seglib import engine, registry
from seglib.checkpoints import load_checkpoint, save_checkpoint
from seglib.files import CheckpointError, ModelError, TrainingError
from seglib.registry import MODELS, build_model


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("size", [(96, 128), (123, 157)])
@torch.no_grad()
def test_every_model_gives_logits_at_the_input_size(name, size):
    torch.manual_seed(0)
    model = build_model(name, n_classes=5).eval()
    logits = model(torch.rand(2, 3, *size))
    assert logits.shape == (2, 5, *size)
    assert torch.isfinite(logits).all()


def _with_bn_statistics(model):
    """``model`` after a few train-mode passes, so its BatchNorms have non-trivial running statistics."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(2, 3, 64, 96) * 2)
    return model.eval()


@pytest.mark.parametrize("name", [n for n in MODELS if n != "fcn_resnet56v2"])  # test_model folds the book's FCN
@torch.no_grad()
def test_folding_batchnorm_keeps_every_model_s_output(name):
    torch.manual_seed(0)
    model = _with_bn_statistics(build_model(name))
    x = torch.rand(2, 3, 64, 96)
    fused = copy.deepcopy(model).fuse_bn_()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
    fast = mu.inference_model(model, torch.bfloat16)  # what evaluate.py runs on a bf16 CPU
    agree = (fast(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)).argmax(1)
             == model(x).argmax(1)).double().mean()
    assert agree > 0.97


@pytest.mark.parametrize("name", ["fcn_resnet56v2", "unet", "lraspp_mobilenet_v3_large"])
@torch.no_grad()
def test_folding_also_folds_the_sync_batchnorm_of_a_sync_bn_run(name):
    """train.py --sync-bn converts BatchNorm2d to SyncBatchNorm; those checkpoints' models fold all the same."""
    torch.manual_seed(0)
    model = _with_bn_statistics(build_model(name))
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    fused = synced.fuse_bn_()

    def left(m):  # BatchNorm layers not folded (the pre-activation ResNet's that follow a residual sum)
        return sum(isinstance(b, torch.nn.modules.batchnorm._BatchNorm) for b in m.modules())
    assert left(fused) == left(copy.deepcopy(model).fuse_bn_()) < left(model)
    x = torch.rand(2, 3, 64, 96)
    ref = model(x)  # float32 rounding scales with the logits, tens here (the Keras classifier's init)
    torch.testing.assert_close(fused(x), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_has_l2_kernels_in_its_backbone(name):
    model = build_model(name)
    backbone = {id(p) for p in model.backbone.parameters()}
    l2 = model.l2_parameters()
    assert l2 and all(id(p) in backbone and p.dim() == 4 for p in l2)
    decayed, plain = engine.build_optimizer(model, 1e-3, 1e-4).param_groups
    assert {id(p) for p in decayed["params"]} == {id(p) for p in l2}
    assert {id(p) for p in decayed["params"] + plain["params"]} == {id(p) for p in model.parameters()}
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def _tiny_run(tmp_path, drinks, *extra):
    args = train.get_args_parser().parse_args([
        "--data-path", str(drinks), "--output-dir", str(tmp_path / "weights"), "--figures-dir",
        str(tmp_path / "figures"), "--workers", "0", "--height", "48", "--width", "64", "--limit", "16",
        "--epochs", "1", "--no-test", "--run-name", "run", "--val-fraction", "0.01", *extra])
    train.main(args)
    return tmp_path / "weights" / "run"


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "unet"])
def test_tiny_run_of_another_model_evaluates_without_model_flags(tmp_path, drinks, name):
    run = _tiny_run(tmp_path, drinks, "--model", name)
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == name
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["config"]["model"] == name
    assert ckpt["config"]["model_options"] == registry.get_spec(name).options
    args = evaluate.get_args_parser().parse_args([
        "--weights", str(run / "best.pt"), "--data-path", str(drinks), "--split", "val", "--workers", "0",
        "--json", str(tmp_path / "val.json"), "--figures-dir", str(tmp_path / "eval")])
    metrics = evaluate.main(args)
    # evaluate.py rebuilds the run's validation split and scores it as the run's own validation did
    validated = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["val"]
    assert metrics["n_images"] == validated["n_images"] == 10
    assert metrics["miou_per_image"] == pytest.approx(validated["miou_per_image"], abs=1e-9)
    assert metrics["miou"] == pytest.approx(validated["miou"], abs=1e-9)
    written = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--weights", str(run / "best.pt"), "--image-file", str(drinks / "0010000.jpg"), "--output-dir",
         str(tmp_path / "files")]))
    assert len(written) == 1 and Path(written[0]).is_file()
    # export.py rebuilds it from the checkpoint too, and onnxruntime agrees with PyTorch before the file is kept
    result = export.main(export.get_args_parser().parse_args(
        ["--weights", str(run / "best.pt"), "--output", str(tmp_path / "m.onnx"), "--data-path", str(drinks),
         "--check-images", "2"]))
    assert result["argmax_agreement"] >= 0.999 and (tmp_path / "m.onnx").is_file()
    # resuming it as another model is refused, with the reason, before anything is trained
    with pytest.raises(TrainingError, match="resume with the same model flags"):
        _tiny_run(tmp_path, drinks, "--resume", "--epochs", "2", "--model", "fcn_resnet56v2")


def test_checkpoint_written_before_the_registry_reads_as_the_books_fcn(tmp_path):
    torch.manual_seed(0)
    model = build_fcn(depth=11, n_layers=2).eval()
    # exactly what train.checkpoint_state wrote before models had names (and before the TensorFlow padding)
    old_config = {"n_classes": 4, "depth": 11, "n_layers": 2, "height": 32, "width": 40,
                  "class_names": ["background", "Water", "Soda", "Juice"]}
    save_checkpoint({"model": model.state_dict(), "config": old_config}, tmp_path / "old.pt")
    ckpt = load_checkpoint(tmp_path / "old.pt")
    assert registry.checkpoint_model(ckpt["config"]) == ("fcn_resnet56v2", {"depth": 11, "n_layers": 2})
    with pytest.raises(CheckpointError, match=r"old.pt: an FCN trained before its stride-2 layers were padded"):
        registry.model_from_checkpoint(ckpt, tmp_path / "old.pt")
    ckpt["config"]["same_padding"] = registry.SAME_PADDING  # as every checkpoint written since says
    loaded = registry.model_from_checkpoint(ckpt, tmp_path / "old.pt").eval()
    x = torch.rand(1, 3, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_checkpoint_naming_an_unknown_model_is_a_clear_error(tmp_path):
    model = build_fcn(depth=11, n_layers=1)
    config = {"n_classes": 4, "model": "segformer_b9", "model_options": {}, "height": 32, "width": 40,
              "class_names": ["a", "b", "c", "d"]}
    save_checkpoint({"model": model.state_dict(), "config": config}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="future.pt: unknown model 'segformer_b9'"):
        registry.model_from_checkpoint(load_checkpoint(tmp_path / "future.pt"), tmp_path / "future.pt")


def test_local_backbone_file_of_the_books_resnet_is_loaded(tmp_path):
    torch.manual_seed(1)
    donor = build_fcn(depth=11, n_layers=1)
    torch.save(donor.backbone.state_dict(), tmp_path / "resnet11v2.pt")
    torch.manual_seed(2)
    model = build_fcn(depth=11, n_layers=1)
    state = registry.read_backbone_weights("fcn_resnet56v2", str(tmp_path / "resnet11v2.pt"))
    registry.load_backbone_(model, "fcn_resnet56v2", state, "resnet11v2.pt")
    for a, b in zip(model.backbone.state_dict().values(), donor.backbone.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(model.lateral[0].conv.weight, donor.lateral[0].conv.weight)  # only the backbone


def test_local_imagenet_classifier_file_fits_the_torchvision_backbone(tmp_path):
    torch.manual_seed(1)
    classifier = mobilenet_v3_large(weights=None)  # the file torchvision's ImageNet weights are: features. + head
    torch.save(classifier.state_dict(), tmp_path / "mobilenet_v3_large.pth")
    model = build_model("lraspp_mobilenet_v3_large")
    state = registry.read_backbone_weights("lraspp_mobilenet_v3_large", str(tmp_path / "mobilenet_v3_large.pth"))
    registry.load_backbone_(model, "lraspp_mobilenet_v3_large", state, "mobilenet_v3_large.pth")
    torch.testing.assert_close(model.backbone["0"][0].weight, classifier.features[0][0].weight, rtol=0, atol=0)


def test_backbone_file_that_does_not_fit_is_refused_by_train(tmp_path, drinks):
    torch.save(build_model("unet", base_channels=8).backbone.state_dict(), tmp_path / "unet_encoder.pt")
    with pytest.raises(ModelError, match=r"unet_encoder.pt: does not fit the backbone of fcn_resnet56v2 \(\d+ of"):
        _tiny_run(tmp_path, drinks, "--pretrained-backbone", str(tmp_path / "unet_encoder.pt"), "--depth", "11")
    assert not (tmp_path / "weights" / "run" / "last.pt").exists()
    torch.save(build_model("unet", base_channels=8).backbone.state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(ModelError, match=r"narrow.pt: does not fit the backbone of unet \(.*of another shape"):
        registry.load_backbone_(build_model("unet"), "unet", torch.load(tmp_path / "narrow.pt"), "narrow.pt")
    (tmp_path / "text.pt").write_text("not tensors")
    with pytest.raises(ModelError, match="text.pt: not a readable state_dict"):
        registry.read_backbone_weights("unet", str(tmp_path / "text.pt"))
    with pytest.raises(ModelError, match="absent.pt: pretrained backbone file not found"):
        registry.read_backbone_weights("unet", str(tmp_path / "absent.pt"))


def test_backbone_from_a_good_file_trains(tmp_path, drinks):
    torch.manual_seed(1)  # other weights than the run's own seed-0 initialisation
    donor = build_fcn(depth=11, n_layers=1).backbone.state_dict()
    torch.save(donor, tmp_path / "resnet11v2.pt")
    run = _tiny_run(tmp_path, drinks, "--pretrained-backbone", str(tmp_path / "resnet11v2.pt"), "--depth", "11",
                    "--n-layers", "1", "--lr", "0")
    assert json.loads((run / "config.json").read_text())["pretrained_backbone"] == str(tmp_path / "resnet11v2.pt")
    # at a rate of 0 the trained kernels are still the file's: the run started from them
    trained = load_checkpoint(run / "best.pt")["model"]
    kernels = [k for k, v in donor.items() if v.dim() == 4]
    assert kernels and all(torch.equal(trained[f"backbone.{k}"], donor[k]) for k in kernels)


class OfflineWeights:
    """Stands for a torchvision weights enum on a machine without internet."""

    url = "https://download.pytorch.org/models/mobilenet_v3_large-8738ca79.pth"

    def get_state_dict(self, progress=True):
        raise URLError("[Errno -3] Temporary failure in name resolution")


def test_imagenet_backbone_offline_and_unavailable_give_one_line_errors(monkeypatch):
    spec = MODELS["lraspp_mobilenet_v3_large"]
    monkeypatch.setitem(MODELS, "lraspp_mobilenet_v3_large", dataclasses.replace(spec, imagenet=OfflineWeights()))
    with pytest.raises(ModelError, match="cannot download .*mobilenet_v3_large-8738ca79.pth .*--pretrained-backbone PATH"
                       ) as err:
        registry.read_backbone_weights("lraspp_mobilenet_v3_large", "imagenet")
    assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match="no ImageNet weights for the backbone of unet"):
        registry.read_backbone_weights("unet", "imagenet")


@pytest.mark.parametrize("parser", [train.get_args_parser, benchmark.get_args_parser])
def test_unknown_model_is_an_argparse_error(parser, capsys):
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(["--model", "segformer_b9"])
    assert exit_.value.code == 2
    assert "invalid choice: 'segformer_b9'" in capsys.readouterr().err


def test_help_lists_every_model(capsys):
    with pytest.raises(SystemExit):
        train.get_args_parser().parse_args(["--help"])
    out = capsys.readouterr().out.replace("\n", " ")
    assert all(name in out for name in MODELS)


def test_default_run_names_follow_the_model():
    parse = train.get_args_parser().parse_args
    assert train.default_run_name(parse([])) == "fcn-resnet56v2-4layer-drinks"
    assert train.default_run_name(parse(["--model", "deeplabv3_resnet50", "--recipe", "cpu"])) == \
        "deeplabv3-resnet50-drinks-cpu"


@pytest.mark.parametrize("name", list(MODELS))
def test_model_options_are_not_taken_from_other_flags(name):
    # an option named like another flag (U-Net's width of the first level against the input --width, say)
    # would silently build another model
    args = train.get_args_parser().parse_args(["--model", name, "--height", "96", "--width", "128"])
    assert registry.model_options(name, args) == registry.get_spec(name).options
