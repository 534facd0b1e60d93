"""Released weights: export.py --format weights writes the model's weights alone under a name carrying its SHA-256,
torch.hub loads it from this folder (a path or a URL) as the model in eval mode, evaluate.py scores it as the
checkpoint, and a file whose hash does not match its name is refused."""
import hashlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

import export
import hubconf
from seglib import scoring
from seglib.checkpoints import load_checkpoint
from seglib.files import CheckpointError, ModelError
from seglib.registry import MODELS, model_from_checkpoint

ROOT = export.Path(export.__file__).parent


@pytest.fixture(autouse=True)
def hub_cache(tmp_path):
    """torch.hub's download cache in a fresh folder: a file cached by an earlier run is not checked again."""
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield
    torch.hub.set_dir(before)


@pytest.fixture(scope="module")
def release(tiny_checkpoint, drinks, tmp_path_factory):
    out = tmp_path_factory.mktemp("release")
    args = export.get_args_parser().parse_args(["--weights", str(tiny_checkpoint), "--format", "weights",
                                                "--output", str(out / "fcn-drinks.pt"), "--data-path", str(drinks),
                                                "--check-images", "2"])
    return export.main(args)


def test_release_is_the_weights_alone_named_by_its_hash(release, tiny_checkpoint):
    path = export.Path(release["output"])
    match = re.fullmatch(r"fcn-drinks-([0-9a-f]{8})\.pt", path.name)
    assert match and hashlib.sha256(path.read_bytes()).hexdigest().startswith(match.group(1))
    state = torch.load(path, weights_only=True)
    assert set(state) == {"model", "config", "class_names", "args", "release"}  # no optimizer, EMA or RNG state
    assert state["class_names"] == ["background", "Water", "Soda", "Juice"]
    # Adam's two moments (in last.pt, which resumes) are left behind
    assert release["bytes"] < (tiny_checkpoint.parent / "last.pt").stat().st_size / 2.5
    assert not list(path.parent.glob(".*tmp"))


def test_a_run_with_an_ema_releases_the_ema_weights(tiny_checkpoint, drinks, tmp_path):
    """The EMA is what such a run validated and kept as best.pt: the release carries it, not the trained weights."""
    ckpt = load_checkpoint(tiny_checkpoint)
    ema = {k: v * 0.5 if v.is_floating_point() else v.clone() for k, v in ckpt["model"].items()}
    ckpt["ema"] = {"model": ema, "updates": 10, "decay": 0.99}
    path = tmp_path / "best.pt"
    torch.save(ckpt, path)
    r = export.main(export.get_args_parser().parse_args([
        "--weights", str(path), "--format", "weights", "--output", str(tmp_path / "ema.pt"), "--data-path",
        str(drinks), "--check-images", "1"]))
    released = torch.load(r["output"], weights_only=True)["model"]
    assert all(torch.equal(released[k], ema[k]) for k in ema)
    assert not torch.equal(released["classifier.weight"], ckpt["model"]["classifier.weight"])


def test_hub_loads_the_release_from_this_folder_in_eval_mode(release, tiny_checkpoint, tmp_path):
    assert {n for n in dir(hubconf) if not n.startswith("_") and callable(getattr(hubconf, n))} == set(MODELS)
    model = torch.hub.load(str(ROOT), "fcn_resnet56v2", source="local", weights=release["output"])
    assert not model.training
    x = torch.rand(1, 3, 64, 96)
    with torch.inference_mode():
        expected = model_from_checkpoint(load_checkpoint(tiny_checkpoint)).eval()(x)
        assert torch.equal(model(x), expected)
        url = export.Path(release["output"]).as_uri()  # file:// through torch.hub's download and hash check
        from_url = hubconf.fcn_resnet56v2(weights=url)
        assert torch.equal(from_url(x), expected)
    with pytest.raises(ModelError, match="holds weights of fcn_resnet56v2, not unet"):
        hubconf.unet(weights=release["output"])
    assert hubconf.unet(n_classes=3, base_channels=8)(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_evaluate_scores_the_release_as_the_checkpoint(release, tiny_checkpoint, drinks):
    common = dict(data_path=drinks, split="val", workers=0, device="cpu", quiet=True)
    ours = scoring.evaluate_checkpoint(release["output"], **common)
    theirs = scoring.evaluate_checkpoint(tiny_checkpoint, **common)
    assert ours["n_images"] == theirs["n_images"] == 10  # the split's seed travelled with the weights
    assert ours["miou"] == theirs["miou"] and ours["miou_per_image"] == theirs["miou_per_image"]


def test_a_file_whose_hash_does_not_match_its_name_is_refused(release, tmp_path):
    wrong = tmp_path / "fcn-drinks-00000000.pt"
    shutil.copy(release["output"], wrong)
    with pytest.raises(CheckpointError, match="SHA-256 does not start with the 00000000 in its name"):
        load_checkpoint(wrong)
    with pytest.raises(CheckpointError, match="SHA-256 does not start with the 00000000 in its name"):
        hubconf.fcn_resnet56v2(weights=wrong.as_uri())
    out = subprocess.run([sys.executable, "evaluate.py", "--weights", str(wrong), "--device", "cpu"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        f"error: {wrong}: its SHA-256 does not start with the 00000000 in its name (a damaged or altered file); "
        f"download or export it again"]


def test_a_cached_download_is_checked_every_time_whatever_its_suffix(release, tmp_path):
    url = export.Path(release["output"]).as_uri()
    hubconf.fcn_resnet56v2(weights=url)  # downloaded into torch.hub's cache, and checked
    cached = export.Path(torch.hub.get_dir()) / "checkpoints" / export.Path(release["output"]).name
    data = bytearray(cached.read_bytes())
    data[-100] ^= 1  # damaged in the cache after the download
    cached.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{re.escape(url)}: its SHA-256 does not start with"):
        hubconf.fcn_resnet56v2(weights=url)
    upper = tmp_path / "fcn-drinks-00000000.PT"
    shutil.copy(release["output"], upper)
    with pytest.raises(CheckpointError, match="PT: its SHA-256 does not start with the 00000000"):
        load_checkpoint(upper)


def test_a_url_to_a_pickle_is_one_line_and_runs_nothing(tmp_path):
    import pickle

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"model": print, "config": {}}))  # a function: not weights
    with pytest.raises(CheckpointError, match=r"evil.pt: not a readable checkpoint \(Weights only load failed"):
        hubconf.fcn_resnet56v2(weights=(tmp_path / "evil.pt").as_uri())
