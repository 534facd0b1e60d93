"""seglib/plots.py: the annotation grid and the row-normalised confusion matrix."""
import numpy as np
import torch
from PIL import Image

import data_generator as dg
from seglib import plots


def test_figure_is_written(drinks, tmp_path):
    test_ann = dg.load_annotations(drinks, "test")
    """4 images in rows of 3 (4 x 3.2 inches each) and a legend below, at 80 dpi; the legend shows each class colour."""
    plots.save_annotation_figure(test_ann, tmp_path / "grid.png", n=4)
    image = Image.open(tmp_path / "grid.png").convert("RGB")
    assert image.size == (960, 560)
    colours = {tuple(c) for c in np.asarray(image).reshape(-1, 3).tolist()}
    assert all(plots.PALETTE[c] in colours for c in (1, 2, 3))
    assert not list(tmp_path.glob(".*tmp*"))


def test_confusion_figure_is_row_normalised():
    confusion = torch.tensor([[8, 2, 0], [1, 3, 0], [0, 0, 0]])
    norm = plots.row_normalised(confusion)
    np.testing.assert_allclose(norm, [[0.8, 0.2, 0.0], [0.25, 0.75, 0.0], [0.0, 0.0, 0.0]])
