"""Data on the device (seglib/device_data.py) against the data loader: the same flip and crop box for every
sampler key, pixels within interpolation rounding, the colour operations as torchvision's, and the memory rule."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import data_generator as dg
from model_utils import DistInfo
from seglib import device_data as dd
from seglib.annotations import train_transform

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def striped(tmp_path_factory):
    """Twelve noisy 90x120 images whose masks are diagonal stripes of the four classes, so that any two crop
    boxes or flips give different masks."""
    root = tmp_path_factory.mktemp("striped")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:90, 0:120]
    names, masks = [], []
    for i in range(12):
        image = (rng.integers(0, 256, (90, 120, 3)) * 0.5 + np.stack([xx * 2, yy * 2, xx + yy], -1) * 0.5)
        Image.fromarray(image.astype(np.uint8)).save(root / f"{i}.png")
        names.append(f"{i}.png")
        masks.append((((xx + 2 * yy + 5 * i) // 7) % 4).astype(np.uint8))
    return dg.Annotations(root, names, ["background", "a", "b", "c"], masks=masks)


def _pair(annotations, augment, random_flip, seed=5, epoch=3, size=None, alternate=False):
    make = lambda h, w: train_transform(h, w, augment, random_flip)  # noqa: E731 - as make_dataset's partial
    dataset = dg.SegmentationDataset(annotations, make(48, 64), workers=2, make_transform=make)
    sampler = dg.EpochSampler(dataset, seed=seed)
    sampler.set_epoch(epoch)
    sampler.size, sampler.alternate_flips = size, alternate
    return dataset, sampler, dd.DeviceTrainLoader(dataset, sampler, 4, CPU, (48, 64), augment, random_flip)


@pytest.mark.parametrize("augment,random_flip,size,alternate", [
    ("full", True, None, False), ("full", False, (32, 40), True), ("flip", True, None, False),
    ("flip", False, (24, 32), True), ("none", True, (60, 80), False)])
def test_device_augmentation_is_the_loaders_key_by_key(striped, augment, random_flip, size, alternate):
    dataset, sampler, device = _pair(striped, augment, random_flip, size=size, alternate=alternate)
    flips, worst, off_by_more = set(), 0, []
    for key in sampler:
        image, mask = dataset[key]
        got_image, got_mask = device.sample(key)
        assert got_image.dtype == torch.uint8 and got_image.shape == image.shape == (3, *(size or (48, 64)))
        assert torch.equal(got_mask, mask), f"key {key}: another crop box or flip than the loader's"
        params = dd.draw_params(key[1], (90, 120), size or (48, 64), augment, random_flip)
        flips.add(params.flip != bool(key[3]))
        diff = (got_image.int() - image.int()).abs()
        worst = max(worst, diff.max().item())
        off_by_more.append((diff > 1).float().mean().item())
    if augment != "none":
        assert flips == {True, False}  # both mirrored and plain samples were compared
    if augment == "full":  # a resize differs by one level at most; the colour jitter can double it, rarely more
        assert worst <= 12 and np.mean(off_by_more) < 0.05
    else:
        assert worst <= 1


def test_draw_params_follow_torchvisions_draws():
    """The flip, box and colour factors are those torchvision's transforms draw under the same seed."""
    transform = train_transform(48, 64, "full")
    flip, crop, jitter = transform.transforms
    image = torch.zeros(3, 90, 120, dtype=torch.uint8)
    make_params = lambda t: getattr(t, "make_params", None) or t._get_params  # noqa: E731 - torchvision < 0.21
    for seed in range(40):
        torch.manual_seed(seed)
        flipped = bool(torch.rand(1) < flip.p)
        box = make_params(crop)([image])
        colour = make_params(jitter)([image])
        got = dd.draw_params(seed, (90, 120), (48, 64), "full", True)
        assert got.flip == flipped
        assert got.box == (box["top"], box["left"], box["height"], box["width"])
        assert got.order == tuple(colour["fn_idx"].tolist())
        assert got.factors == (colour["brightness_factor"], colour["contrast_factor"], colour["saturation_factor"],
                               colour["hue_factor"])
    state = torch.get_rng_state()
    dd.draw_params(7, (90, 120), (48, 64), "full", True)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was


@pytest.mark.parametrize("op,factor,kernel", [
    (dd.BRIGHTNESS, 1.17, TF.adjust_brightness), (dd.CONTRAST, 0.83, TF.adjust_contrast),
    (dd.SATURATION, 1.19, TF.adjust_saturation), (dd.HUE, 0.018, TF.adjust_hue), (dd.HUE, -0.02, TF.adjust_hue)])
def test_colour_operations_are_torchvisions_uint8_kernels(op, factor, kernel):
    image = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(op))
    want = kernel(image, factor).int()
    got = dd.adjust_colour(image.float(), op, factor)
    assert torch.equal(got, got.floor()) and got.min() >= 0 and got.max() <= 255
    diff = (got.int() - want).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_resize_is_torchvisions_float_resize_rounded():
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for out in [(100, 140), (20, 28), (50, 70)]:
        want = TF.resize(image.float(), list(out), antialias=True).round()
        assert torch.equal(dd.resize_image(image, out), want)
        assert (dd.resize_image(image, out).int() - TF.resize(image, list(out), antialias=True).int()).abs().max() <= 1


def test_eval_loader_matches_the_loaders_batches(striped):
    dataset = dg.SegmentationDataset(striped, dg.eval_transform(48, 64), workers=2)
    loader = dg.build_loader(dataset, 5, False, workers=0)
    device = dd.DeviceEvalLoader(dataset, loader.sampler, 5, CPU, (48, 64))
    assert len(device) == len(loader) == 3
    for (images, masks), (got_images, got_masks) in zip(loader, device, strict=True):
        assert got_images.shape == images.shape and (got_images.int() - images.int()).abs().max() <= 1
        assert all(torch.equal(a, b) for a, b in zip(masks, got_masks, strict=True))


def test_train_loader_batches_skip_and_drop_the_last_partial_batch(striped):
    dataset, sampler, device = _pair(striped, "full", True)
    assert len(device) == 3 and [x.shape for x, _ in device] == [(4, 3, 48, 64)] * 3
    sampler.skip = 5  # a resumed epoch: 7 samples left, one full batch
    batches = list(device)
    assert len(device) == len(batches) == 1
    keys = list(sampler)[:4]
    assert torch.equal(batches[0][1], torch.stack([device.sample(k)[1] for k in keys]))


def test_colour_operations_run_in_the_order_drawn(striped):
    """ColorJitter draws the order of its four operations per sample: run in that order, the device's images are
    much closer to the loader's than run in a fixed order (per-key noise is the resize's rounding)."""
    dataset, sampler, device = _pair(striped, "full", True)
    drawn, fixed = 0.0, 0.0
    for index, seed, size, flip in sampler:
        params = dd.draw_params(seed, (90, 120), size or (48, 64), "full", True)
        image, mask = device.images[index], device.masks[index]
        if flip:
            image, mask = image.flip(-1), mask.flip(-1)
        expected = dataset[(index, seed, size, flip)][0].float()
        in_order = dd.augment_sample(image, mask, params, size or (48, 64))[0].float()
        sorted_params = dd.SampleParams(params.flip, params.box, tuple(sorted(params.order)), params.factors)
        in_fixed_order = dd.augment_sample(image, mask, sorted_params, size or (48, 64))[0].float()
        drawn += (in_order - expected).abs().mean().item()
        fixed += (in_fixed_order - expected).abs().mean().item()
    assert drawn < 0.7 * fixed, (drawn, fixed)  # measured: about 0.4


def test_batches_follow_the_samplers_epoch_size_and_flips(striped):
    """The device loader's batches are the loader's samples under the sampler's epoch, progressive size and
    alternate flips, and another epoch gives other batches."""
    dataset, sampler, device = _pair(striped, "flip", False, epoch=3, size=(32, 40), alternate=True)
    keys = list(sampler)
    assert {k[2] for k in keys} == {(32, 40)} and {k[3] for k in keys} == {True, False}
    batches = list(device)
    assert [tuple(m.shape) for _, m in batches] == [(4, 32, 40)] * 3
    for b, (_, masks) in enumerate(batches):
        assert torch.equal(masks, torch.stack([dataset[k][1] for k in keys[4 * b:4 * b + 4]]))
    sampler.set_epoch(4)
    assert not torch.equal(next(iter(device))[1], batches[0][1])


def test_memory_rule_and_fallback_line(striped, monkeypatch):
    dataset = dg.SegmentationDataset(striped, None, workers=1)
    n_bytes = dd.decoded_bytes(dataset)
    assert n_bytes == 12 * 90 * 120 * 4
    assert dd.data_on_device(None, CPU, [dataset]) == (False, None)  # off by default on the CPU
    assert dd.data_on_device(True, CPU, [dataset]) == (True, None)
    assert dd.data_on_device(False, torch.device("cuda"), [dataset]) == (False, None)

    memory = {"free": 4 * n_bytes, "total": 100 * n_bytes}  # a GPU that other work already fills
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (memory["free"], memory["total"]))
    assert dd.data_on_device(None, torch.device("cuda"), [dataset]) == (True, None)  # exactly a quarter
    memory["free"] = 4 * n_bytes - 1  # a quarter of the total would still hold it 25 times
    on, line = dd.data_on_device(None, torch.device("cuda"), [dataset])
    assert not on and "exceeds a quarter of cuda's free memory" in line and "using the data loader" in line
    uncached = dg.SegmentationDataset(striped, None, cache_images=False)
    assert dd.data_on_device(True, CPU, [uncached])[0] is False


def test_running_out_of_memory_while_copying_falls_back_to_the_loader(striped, monkeypatch, capsys):
    """Free memory weighed, then taken by another process before the copy: one line, and the loaders."""
    dataset = dg.SegmentationDataset(striped, None, workers=1)
    args = argparse.Namespace(batch_size=2, workers=0, seed=0, data_on_device=True, height=32, width=40,
                              augment="flip", flips="random")

    def no_memory(*a):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert isinstance(dd.build_loaders(args, dataset, dataset, CPU, DistInfo())[0], dd.DeviceTrainLoader)
    monkeypatch.setattr(dd, "_to_device", no_memory)
    train_loader, val_loader = dd.build_loaders(args, dataset, dataset, CPU, DistInfo())
    assert isinstance(train_loader, torch.utils.data.DataLoader) and isinstance(val_loader, torch.utils.data.DataLoader)
    assert capsys.readouterr().out.strip() == ("--data-on-device: cpu ran out of memory while the data was copied "
                                               "there; using the data loader")


def test_augmentation_seeds_only_the_cpu_generator(striped, monkeypatch):
    """torch.manual_seed also reseeds every GPU, whose state fork_rng(devices=[]) does not restore: dropout in the
    torchvision models would then draw from the augmentation's seeds. Both augmentation paths leave GPUs alone."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    dataset, sampler, device = _pair(striped, "full", True)
    state = torch.get_rng_state()
    key = next(iter(sampler))
    dataset[key], device.sample(key)
    assert calls == [] and torch.equal(torch.get_rng_state(), state)  # the CPU's own state is put back too
