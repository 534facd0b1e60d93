"""seglib/annotations.py: augmentation keeps image and mask aligned; flip mirrors both together."""
import numpy as np
import pytest
import torch
from torchvision import tv_tensors

import data_generator as dg
from seglib import annotations, plots


@pytest.fixture(scope="module")
def test_ann(drinks):
    return dg.load_annotations(drinks, "test")


def test_augmented_image_and_mask_stay_aligned(test_ann):
    """Paint each class in its palette colour, augment, and read the classes back from the colours."""
    palette = np.asarray(plots.PALETTE[:4], dtype=np.uint8)  # the drinks classes
    transform = annotations.train_transform(240, 320, "full")
    torch.manual_seed(0)
    for i in range(12):
        mask = test_ann.mask(i)
        image = torch.from_numpy(palette[mask]).permute(2, 0, 1)
        out_img, out_mask = transform(tv_tensors.Image(image), tv_tensors.Mask(torch.from_numpy(mask)))
        assert out_img.shape == (3, 240, 320) and out_mask.shape == (240, 320)
        assert out_mask.dtype == torch.uint8 and set(out_mask.unique().tolist()) <= {0, 1, 2, 3}
        pixels = out_img.permute(1, 2, 0).reshape(-1, 1, 3).float()
        decoded = (pixels - torch.from_numpy(palette).float()).norm(dim=-1).argmin(-1).reshape(240, 320)
        agreement = (decoded == out_mask.long()).float().mean().item()
        assert agreement > 0.97, f"image {i}: only {agreement:.3f} of pixels agree"


def test_flip_augmentation_only_mirrors_image_and_mask_together(test_ann):
    mask = tv_tensors.Mask(torch.from_numpy(test_ann.mask(0)))
    image = tv_tensors.Image(torch.from_numpy(np.asarray(plots.PALETTE, dtype=np.uint8)[mask.numpy()]).permute(2, 0, 1))
    resize = annotations.train_transform(120, 160, "none")
    plain = resize(image, mask)
    mirrored = resize(tv_tensors.Image(image.flip(-1)), tv_tensors.Mask(mask.flip(-1)))
    assert plain[0].shape == (3, 120, 160) and plain[1].shape == (120, 160)
    assert not torch.equal(plain[1], mirrored[1])
    flip = annotations.train_transform(120, 160, "flip")
    flipped = []
    for seed in range(8):
        torch.manual_seed(seed)
        out_img, out_mask = flip(image, mask)
        expected = mirrored if torch.equal(out_mask, mirrored[1]) else plain
        assert torch.equal(out_img, expected[0]) and torch.equal(out_mask, expected[1])
        flipped.append(expected is mirrored)
    assert any(flipped) and not all(flipped)
    with pytest.raises(ValueError, match="augment must be one of full, flip, none"):
        annotations.train_transform(120, 160, "crop")
