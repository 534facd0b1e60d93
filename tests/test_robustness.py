"""Bad input, script by script: every row is a flag or file a user can get wrong, and each must end in exit
status 1 (2 for argparse's own checks) with one line that names the flag or the file, no traceback, and nothing
written or lost. The scripts run in this process through their own entry point (run_cli), as from the shell."""
import json
import re
import shutil
import struct
import sys
import zlib

import pytest
import torch
from PIL import Image

import benchmark
import curves
import data_generator
import evaluate
import export
import train
from seglib.files import DataError, image_size, output_names, read_image, run_cli

SCRIPTS = {"train": train, "evaluate": evaluate, "export": export, "benchmark": benchmark, "curves": curves,
           "data_generator": data_generator}
TINY = ["--height", "32", "--width", "40", "--workers", "0", "--device", "cpu", "--depth", "11", "--n-layers", "1"]

# (script, arguments, exit status, what the last line of stderr must hold). In the arguments {data} is the
# dataset, {run} a finished tiny run's folder (last.pt, best.pt, metrics.jsonl), {tmp} an empty folder, {file} a
# file there, {bad_pt} a file that is no checkpoint, {bad_onnx} one that is no ONNX model.
ROWS = [
    ("train", ["--epochs", "0"], 1, "--epochs 0: must be at least 1"),
    ("train", ["--epochs", "x"], 2, "argument --epochs: invalid int value: 'x'"),
    ("train", ["--batch-size", "0"], 1, "--batch-size 0: must be at least 1"),
    ("train", ["--height", "16"], 1, "--height 16: must be at least 32"),
    ("train", ["--width", "0"], 1, "--width 0: must be at least 32"),
    ("train", ["--workers", "-1"], 1, "--workers -1: must be 0 or more"),
    ("train", ["--lr", "-0.1"], 1, "--lr -0.1: must be 0 or more"),
    ("train", ["--val-fraction", "0"], 1, "--val-fraction 0.0: must be between 0 and 1"),
    ("train", ["--val-fraction", "1"], 1, "--val-fraction 1.0: must be between 0 and 1"),
    ("train", ["--limit", "0"], 1, "--limit 0: must be at least 1"),
    ("train", ["--limit", "5000"], 1, "--limit 5000: split 'train' of .* has 995 images"),
    ("train", ["--limit", "2", "--batch-size", "4"], 1, "--batch-size 4: 2 training images give no full batch"),
    ("train", ["--device", "tpu"], 1, "--device tpu: not a device name"),
    ("train", ["--device", "mps"], 1, "--device mps: this machine has no mps device"),
    ("train", ["--ema", "1.5"], 2, "argument --ema: EMA decay must be 0 \\(off\\) or in \\(0, 1\\)"),
    ("train", ["--model", "vgg"], 2, "argument --model: invalid choice: 'vgg'"),
    ("train", ["--loss", "focal"], 2, "argument --loss: invalid choice: 'focal'"),
    ("train", ["--loss-weight", "-1"], 1, "--loss-weight -1.0: must be 0 or more"),
    ("train", ["--class-weights", "a,b"], 2, "argument --class-weights: expected none, auto or comma-separated"),
    ("train", ["--progressive", "64:0.5"], 2, "argument --progressive: expected HxW:UNTIL such as 64x96:0.5"),
    ("train", ["--progressive", "64x96:1.5"], 2, "argument --progressive: '64x96:1.5': sizes must be at least 32"),
    ("train", ["--tta", "scale"], 2, "argument --tta: invalid choice: 'scale'"),
    ("train", ["--run-name", "../../x"], 1, "--run-name ../../x: a run name is one folder name"),
    ("train", ["--run-name", "{tmp}/abs"], 1, "abs: a run name is one folder name"),
    ("train", ["--run-name", ".."], 1, "--run-name ..: a run name is one folder name"),
    ("train", ["--data-path", "{tmp}/missing"], 1, "missing: data folder not found"),
    ("train", ["--data-path", "{file}"], 1, "file.txt: is a file; --data-path takes the folder"),
    ("train", ["--output-dir", "{file}"], 1, "file.txt.*(Not a directory|File exists)"),
    ("train", ["--pretrained-backbone", "{tmp}/none.pt"], 1, "none.pt"),
    ("train", ["--output-dir", "{run}/..", "--run-name", "run"], 1, "last.pt exists: pass --resume"),
    ("train", ["--output-dir", "{run}/..", "--run-name", "run", "--resume", "--height", "96"], 1,
     "--height 96: .*last.pt was trained with --height 32; resume with the same value"),
    ("train", ["--output-dir", "{run}/..", "--run-name", "run", "--resume", "--batch-size", "2"], 1,
     "--batch-size 2: .*last.pt was trained with --batch-size 4"),
    ("train", ["--output-dir", "{run}/..", "--run-name", "run", "--resume", "--data-path", "{tmp}"], 1,
     "--data-path .*: .*last.pt was trained with --data-path"),
    ("train", ["--output-dir", "{run}/..", "--run-name", "run", "--resume", "--model", "unet"], 1,
     "resume with the same model flags"),
    ("evaluate", ["--weights", "{tmp}/missing.pt"], 1, "missing.pt: checkpoint not found"),
    ("evaluate", ["--weights", "{tmp}"], 1, ": is a folder, not a checkpoint file"),
    ("evaluate", ["--weights", "{bad_pt}"], 1, "bad.pt: not a readable checkpoint"),
    ("evaluate", ["--weights", "{bad_onnx}"], 1, "bad.onnx: not a readable ONNX model"),
    ("evaluate", ["--weights", "{run}/best.pt", "--batch-size", "0"], 1, "--batch-size 0: must be at least 1"),
    ("evaluate", ["--weights", "{run}/best.pt", "--limit", "0"], 1, "--limit 0: must be at least 1"),
    ("evaluate", ["--weights", "{run}/best.pt", "--limit", "500"], 1, "--limit 500: split 'test' of .* has 51 images"),
    ("evaluate", ["--weights", "{run}/best.pt", "--figures", "-1"], 1, "--figures -1: must be 0 or more"),
    ("evaluate", ["--weights", "{run}/best.pt", "--device", "tpu"], 1, "--device tpu: not a device name"),
    ("evaluate", ["--weights", "{run}/best.pt", "--data-path", "{tmp}/missing"], 1, "missing: data folder not found"),
    ("evaluate", ["--weights", "{run}/best.pt", "--image-file", "{tmp}/none.jpg"], 1,
     "none.jpg: no such image file or folder"),
    ("evaluate", ["--weights", "{run}/best.pt", "--image-file", "{tmp}"], 1, ": no images found"),
    ("evaluate", ["--weights", "{run}/best.pt", "--limit", "2", "--json", "{file}/m.json"], 1,
     "file.txt.*(Not a directory|File exists)"),
    ("evaluate", ["--weights", "{run}/best.pt", "--split", "all"], 2, "argument --split: invalid choice"),
    ("export", ["--weights", "{tmp}/missing.pt"], 1, "missing.pt: checkpoint not found"),
    ("export", ["--weights", "{bad_onnx}"], 1, "bad.onnx: is an ONNX file already; --weights takes a checkpoint"),
    ("export", ["--weights", "{run}/best.pt", "--output", "{tmp}"], 1, ": is a folder; --output takes the ONNX file"),
    ("export", ["--weights", "{run}/best.pt", "--output", "{file}/m.onnx"], 1, "m.onnx: cannot write the ONNX file"),
    ("export", ["--weights", "{run}/best.pt", "--check-images", "-1"], 1, "--check-images -1: must be 0 or more"),
    ("export", ["--weights", "{run}/best.pt", "--min-agreement", "2"], 1, "--min-agreement 2.0: must be between 0 and 1"),
    ("benchmark", ["--height", "0"], 1, "--height 0: must be at least 32"),
    ("benchmark", ["--batch-size", "0"], 1, "--batch-size 0: must be at least 1"),
    ("benchmark", ["--steps", "0"], 1, "--steps 0: must be at least 1"),
    ("benchmark", ["--workers", "2", "-1"], 1, "--workers 2 -1: must be 0 or more"),
    ("benchmark", ["--data-images", "0"], 1, "--data-images 0: must be at least 1"),
    ("benchmark", ["--device", "tpu"], 1, "--device tpu: not a device name"),
    ("benchmark", ["--model", "vgg"], 2, "argument --model: invalid choice: 'vgg'"),
    ("curves", ["--run", "nolabel"], 2, "argument --run: expected LABEL=PATH"),
    ("curves", ["--run", "a={tmp}/missing"], 1, "missing: no metrics.jsonl there"),
    ("curves", ["--run", "a={run}", "--output", "{file}/t.png"], 1, "file.txt.*(Not a directory|File exists)"),
    ("curves", ["--models", "{tmp}"], 1, ": not a finished run with config.json and test_metrics.json"),
    ("data_generator", ["--data-path", "{tmp}/missing"], 1, "missing: data folder not found"),
    ("data_generator", ["--data-path", "{file}"], 1, "file.txt: is a file; --data-path takes the folder"),
    ("data_generator", ["--workers", "0"], 1, "--workers 0: must be at least 1"),
    ("data_generator", ["--split", "test", "--figure", "{file}/grid.png"], 1,
     "file.txt.*(Not a directory|File exists)"),
    ("data_generator", ["--legacy-masks", "{tmp}/masks.npy"], 1, "masks.npy: the book's .npy masks are a pickle"),
    ("data_generator", ["--download", "--archive", "{tmp}/none.tar.gz", "--data-path", "{tmp}/d"], 1, "none.tar.gz"),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, drinks):
    """A finished tiny run (1 epoch at 32x40, 8 images, ResNet11 with one pyramid layer: small checkpoints), the
    folder a user would resume or evaluate."""
    out = tmp_path_factory.mktemp("finished") / "weights"
    train.main(train.get_args_parser().parse_args(["--data-path", str(drinks), "--output-dir", str(out),
                                                   "--run-name", "run", "--limit", "8", "--epochs", "1",
                                                   "--val-fraction", "0.005", "--no-test", "--figures-dir",
                                                   str(out.parent / "f"), *TINY]))
    return out / "run"


def _snapshot(folder):
    """{path: bytes} of every file under ``folder``."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_script(name, argv, monkeypatch, capsys):
    """(exit status, last line of the error output, whole error output, standard output) of ``name.py argv``
    through run_cli."""
    module = SCRIPTS[name]
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main, module.get_args_parser())
    code, captured = exit_info.value.code, capsys.readouterr()
    if isinstance(code, str):  # sys.exit("error: ...") prints it and exits with status 1
        return 1, code, captured.err + code, captured.out
    return code, (captured.err.strip().splitlines() or [""])[-1], captured.err, captured.out


@pytest.mark.parametrize("script, argv, status, message", ROWS,
                         ids=[f"{r[0]}:{' '.join(r[1])}"[:80] for r in ROWS])
def test_bad_input_ends_in_one_clear_line(script, argv, status, message, finished_run, drinks, tmp_path,
                                          monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "file.txt").write_text("not a folder")
    (work / "bad.pt").write_bytes(b"not a checkpoint")
    (work / "bad.onnx").write_bytes(b"not an onnx model")
    run = tmp_path / "weights" / "run"
    shutil.copytree(finished_run, run)
    places = {"data": str(drinks), "run": str(run), "tmp": str(work), "file": str(work / "file.txt"),
              "bad_pt": str(work / "bad.pt"), "bad_onnx": str(work / "bad.onnx")}
    argv = [a.format(**places) for a in argv]
    defaults = {"train": ["--data-path", str(drinks), "--output-dir", str(work / "out"), "--figures-dir",
                          str(work / "figs"), *TINY, "--limit", "8", "--epochs", "1", "--no-test",
                          "--val-fraction", "0.005"],
                "evaluate": ["--data-path", str(drinks), "--workers", "0", "--figures-dir", str(work / "figs"),
                             "--output-dir", str(work / "preds")],
                "export": ["--data-path", str(drinks)],
                "benchmark": ["--data-path", str(drinks), "--device", "cpu", "--height", "32", "--width", "32"],
                "data_generator": ["--data-path", str(drinks)]}.get(script, [])
    before = _snapshot(tmp_path)
    code, last_line, err, _ = _run_script(script, defaults + argv, monkeypatch, capsys)
    assert code == status, err
    assert "Traceback" not in err
    if status == 1:
        assert last_line.startswith("error: ") and "\n" not in last_line.strip()
    assert re.search(message, last_line), last_line
    assert _snapshot(tmp_path) == before  # nothing written, nothing changed, no temporary file left


def test_resume_with_a_torn_metrics_line_keeps_the_complete_epochs(finished_run, drinks, tmp_path):
    """A run killed while writing metrics.jsonl leaves a torn last line: --resume drops it, and curves.py uses
    the complete lines and says so."""
    run = tmp_path / "weights" / "run"
    shutil.copytree(finished_run, run)
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 2, "train_lo')
    rows = curves.read_metrics(run)
    assert [r["epoch"] for r in rows] == [1]
    train.main(train.get_args_parser().parse_args(["--data-path", str(drinks), "--output-dir", str(tmp_path / "weights"),
                                                   "--run-name", "run", "--limit", "8", "--epochs", "2", "--resume",
                                                   "--val-fraction", "0.005", "--no-test", "--figures-dir",
                                                   str(tmp_path / "f"), *TINY]))
    assert [json.loads(ln)["epoch"] for ln in metrics.read_text().splitlines()] == [1, 2]


def test_resume_with_weights_of_the_wrong_shape_changes_nothing(finished_run, drinks, tmp_path, monkeypatch, capsys):
    """last.pt whose config matches the flags but whose tensors do not fit the model: one line, and the run's
    config.json, metrics and checkpoints stay as they were."""
    run = tmp_path / "weights" / "run"
    shutil.copytree(finished_run, run)
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    name = next(k for k, v in ckpt["model"].items() if v.ndim == 4)
    ckpt["model"][name] = torch.zeros(*ckpt["model"][name].shape[:-1], ckpt["model"][name].shape[-1] + 2)
    torch.save(ckpt, run / "last.pt")
    (run / "config.json").write_text((run / "config.json").read_text() + "\n")  # told apart from a rewrite
    before = _snapshot(tmp_path)
    code, last_line, err, _ = _run_script("train", [
        "--data-path", str(drinks), "--output-dir", str(tmp_path / "weights"), "--run-name", "run", "--resume",
        "--limit", "8", "--epochs", "2", "--val-fraction", "0.005", "--no-test", "--figures-dir",
        str(tmp_path / "f"), *TINY], monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err
    assert re.search(r"last.pt: its weights do not fit this run's model \(.*size mismatch", last_line), last_line
    assert _snapshot(tmp_path) == before


def test_a_folder_with_a_broken_photo_gets_every_good_photo_segmented(finished_run, drinks, tmp_path, monkeypatch,
                                                                      capsys):
    """The broken JPEG sorts first; the other photos still get their mask and overlay, a file that is not an image
    is skipped and counted, two inputs with one stem keep apart, and the exit is non-zero with the list."""
    photos, more, out = tmp_path / "photos", tmp_path / "more", tmp_path / "out"
    photos.mkdir()
    more.mkdir()
    good = (drinks / "0010000.jpg").read_bytes()
    (photos / "0a-broken.jpg").write_bytes(good[: len(good) // 3])
    for name in ("b.jpg", "c.jpg", "d.jpg"):
        shutil.copy(drinks / "0010001.jpg", photos / name)
    (photos / "notes.txt").write_text("not an image")
    shutil.copy(drinks / "0010002.jpg", more / "b.jpg")
    code, last_line, err, stdout = _run_script("evaluate", ["--weights", str(finished_run / "best.pt"), "--image-file",
                                                    str(photos), str(more), "--output-dir", str(out), "--device",
                                                    "cpu"], monkeypatch, capsys)
    assert code == 1 and re.search(r"1 of 5 images could not be read \(listed above\); the other 4 were written",
                                   last_line), last_line
    assert "0a-broken.jpg: skipped" in err
    assert "wrote masks and overlays of 4 of 5 images" in stdout and "1 files that are not images skipped" in stdout
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{n}-{kind}.png" for n in ("photos-b-jpg", "more-b-jpg", "c", "d")
                             for kind in ("mask", "overlay"))


def test_export_without_the_dataset_checks_on_seeded_random_images(finished_run, tmp_path):
    result = export.main(export.get_args_parser().parse_args([
        "--weights", str(finished_run / "best.pt"), "--output", str(tmp_path / "m.onnx"), "--data-path",
        str(tmp_path / "no-dataset-here")]))
    assert result["checked_on"].startswith("4 seeded random images")
    assert result["argmax_agreement"] >= 0.999 and (tmp_path / "m.onnx").is_file()


def test_image_outputs_stay_inside_their_folder_and_apart(finished_run, drinks, tmp_path):
    """``folder/..jpg`` once wrote ``out-mask.png`` beside ``out``; ``sub1/a.jpg`` and ``sub2/a.jpg`` share a stem."""
    photo = sorted(drinks.glob("*.jpg"))[0].read_bytes()
    for name in ("folder/..jpg", "sub1/a.jpg", "sub2/a.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(photo)
    out = tmp_path / "out"
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--weights", str(finished_run / "best.pt"), "--output-dir", str(out), "--device", "cpu",
         "--image-file", *(str(tmp_path / n) for n in ("folder/..jpg", "sub1/a.jpg", "sub2/a.jpg"))]))
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert all(p.startswith("out/") and not p.split("/")[-1].startswith(".") for p in written), written
    assert len(written) == 6  # a mask and an overlay of each photo


def test_output_names_are_one_visible_component_each():
    names = output_names(["folder/..jpg", "sub1/a.jpg", "sub2/a.jpg", "x/.hidden.png", "y/../b c.jpg", "a.b/..."])
    assert names[1:3] == ["sub1-a-jpg", "sub2-a-jpg"] and len(set(names)) == len(names)
    assert all(n not in ("", ".", "..") and "/" not in n and not n.startswith(".") for n in names), names


def _png_header(width, height):
    """A PNG of a few dozen bytes that declares ``width`` x ``height`` pixels (and holds almost no pixel data)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_an_image_larger_than_a_photo_is_one_line(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_header(40000, 40000))  # 1.6 gigapixels in a few dozen bytes
    with pytest.raises(DataError, match=r"bomb.png: over the 60 megapixels of the largest photos \(Image size"):
        image_size(tmp_path / "bomb.png")
    Image.new("L", (9500, 9500)).save(tmp_path / "big.png")  # a small file that decodes to 90 megapixels
    with pytest.raises(DataError, match=r"big.png: 9500x9500 pixels, over the 60 megapixels"):
        read_image(tmp_path / "big.png")
    Image.new("RGB", (640, 480)).save(tmp_path / "photo.png")
    assert image_size(tmp_path / "photo.png") == (480, 640) and read_image(tmp_path / "photo.png").shape == (480, 640, 3)
