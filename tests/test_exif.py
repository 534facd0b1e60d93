"""Phone photos: a JPEG stored turned, with an EXIF orientation tag, is read upright (as photo viewers and the VIA
annotator show it), in evaluate.py --image-file and in the dataset, whose regions are drawn on the upright photo.

Each stored image is made from the upright one by the inverse of what its tag asks a viewer to do (EXIF 2.32,
tag 0x0112), written out here from the standard rather than taken from Pillow's table."""
import json

import numpy as np
import pytest
from PIL import Image

import data_generator as dg
import evaluate
from seglib.files import image_size, read_image

HEIGHT, WIDTH = 48, 64  # the upright photo is landscape, so a sideways tag must swap the sides
STORED_FROM_UPRIGHT = {
    1: lambda u: u,
    2: lambda u: u[:, ::-1],  # viewer mirrors left-right
    3: lambda u: u[::-1, ::-1],  # viewer turns 180 degrees
    4: lambda u: u[::-1],  # viewer mirrors top-bottom
    5: lambda u: u.transpose(1, 0, 2),  # viewer mirrors about the main diagonal
    6: lambda u: np.rot90(u, 1),  # viewer turns 90 degrees clockwise, so the camera stored it turned back
    7: lambda u: u[::-1, ::-1].transpose(1, 0, 2),  # viewer mirrors about the other diagonal
    8: lambda u: np.rot90(u, -1),  # viewer turns 90 degrees counter-clockwise
}


def _upright():
    """A landscape image no turn or mirror leaves alike: four colour blocks of unequal size."""
    u = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    u[:16, :24] = (230, 30, 30)
    u[:16, 24:] = (30, 200, 30)
    u[16:, :24] = (30, 30, 230)
    u[16:, 24:] = (230, 230, 30)
    return u


def _save_tagged(path, stored, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(stored)).save(path, quality=95, exif=exif)


@pytest.mark.parametrize("orientation", sorted(STORED_FROM_UPRIGHT))
def test_tagged_jpeg_is_read_upright(orientation, tmp_path):
    upright = _upright()
    path = tmp_path / f"o{orientation}.jpg"
    _save_tagged(path, STORED_FROM_UPRIGHT[orientation](upright), orientation)
    image = read_image(path)
    assert image.shape == upright.shape and image_size(path) == (HEIGHT, WIDTH)
    assert np.abs(image.astype(int) - upright).mean() < 4  # JPEG loss only; a wrong turn is off by ~100


def test_sideways_photo_segmented_upright(tiny_checkpoint, tmp_path):
    path = tmp_path / "phone.jpg"
    _save_tagged(path, STORED_FROM_UPRIGHT[6](_upright()), 6)
    written = evaluate.segment_files(tiny_checkpoint, [path], tmp_path / "out", device="cpu")
    assert Image.open(written[0]).size == (WIDTH, HEIGHT)
    assert Image.open(tmp_path / "out" / "phone-overlay.png").size == (WIDTH, HEIGHT)


def test_dataset_regions_match_a_sideways_photo(tmp_path):
    """The red block, annotated on the upright photo, is where class 1 is in the dataset's mask and image."""
    _save_tagged(tmp_path / "phone.jpg", STORED_FROM_UPRIGHT[8](_upright()), 8)
    region = {"shape_attributes": {"name": "rect", "x": 0, "y": 0, "width": 24, "height": 16},
              "region_attributes": {"Name": "1"}}
    via = {"_via_img_metadata": {"phone.jpg1": {"filename": "phone.jpg", "size": 1, "regions": [region],
                                                "file_attributes": {}}}}
    (tmp_path / "segmentation_train.json").write_text(json.dumps(via))
    ann = dg.load_annotations(tmp_path, "train")
    assert ann.sizes == [(HEIGHT, WIDTH)]
    image, mask = dg.SegmentationDataset(ann, workers=1)[0]  # (3, H, W), (H, W): no transform
    assert image.shape == (3, HEIGHT, WIDTH) and mask.shape == (HEIGHT, WIDTH)
    red = (image[0] > 150) & (image[1] < 100) & (image[2] < 100)
    assert (red == (mask == 1)).float().mean() > 0.98  # all but the rectangle's closing row and column
