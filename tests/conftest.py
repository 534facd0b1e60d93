"""Shared fixtures. Tests that need the real drinks dataset find it through $DRINKS_DATA (default
dataset/drinks, as the scripts) and fail, never skip, when it is missing."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def drinks():
    """The real drinks dataset folder: $DRINKS_DATA, else dataset/drinks under the project."""
    path = Path(os.environ.get("DRINKS_DATA") or ROOT / "dataset" / "drinks").resolve()
    if not (path / "segmentation_train.json").is_file():
        pytest.fail(f"no drinks dataset at {path} (no segmentation_train.json): set DRINKS_DATA to its folder, "
                    f"or run: python data_generator.py --download")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, drinks):
    """best.pt of one short epoch at 60x80 on 48 real training images (seed 3, 10 validation images): a trained,
    if weak, model."""
    import train

    tmp = tmp_path_factory.mktemp("tiny")
    train.main(train.get_args_parser().parse_args([
        "--data-path", str(drinks), "--output-dir", str(tmp / "weights"), "--figures-dir", str(tmp / "figures"),
        "--run-name", "run", "--workers", "0", "--height", "60", "--width", "80", "--limit", "48", "--epochs", "1",
        "--seed", "3", "--no-test", "--val-fraction", "0.01"]))
    return tmp / "weights" / "run" / "best.pt"


@pytest.fixture
def ctrl_c_at_step():
    """A factory of cross-entropy criteria that send this process Ctrl-C (SIGINT) during their ``n``-th call, as a
    user does in the middle of a run: ``monkeypatch.setattr(train, "build_criterion", lambda *a: ctrl_c_at_step(9))``."""
    import signal

    import torch

    def criterion_for(n):
        calls = {"n": 0}

        def criterion(logits, target):
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGINT)
            return torch.nn.functional.cross_entropy(logits, target)

        return criterion

    return criterion_for
