"""The project's FCN against Keras itself: the book's padding of stride-2 layers, the classifier's initialisation,
the book's Adam, and the book's own weights file read into PyTorch (Keras 3 on its torch backend writes it)."""
import keras_book  # noqa: I001 - selects Keras's torch backend before keras is imported anywhere
import h5py
import keras
import numpy as np
import pytest
import torch
from torch import nn

import evaluate
import export
from fcn import build_fcn
from seglib.checkpoints import load_checkpoint, load_keras_fcn
from resnet import ConvBNReLU, ConvTranspose2d
from seglib.engine import KerasAdam, build_optimizer
from seglib.files import CheckpointError
from seglib.registry import model_from_checkpoint


def _nchw(y):
    return torch.from_numpy(keras.ops.convert_to_numpy(y)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("size", [(8, 12), (9, 13), (8, 13)])
def test_stride2_conv_pads_as_keras(size):
    torch.manual_seed(0)
    x = torch.randn(2, 5, *size)
    layer = keras.layers.Conv2D(3, 3, strides=2, padding="same", bias_initializer="random_normal")
    expected = _nchw(layer(x.permute(0, 2, 3, 1).numpy()))
    ours = ConvBNReLU(5, 3, 3, stride=2).conv  # the pyramid's conv
    kernel, bias = (torch.from_numpy(keras.ops.convert_to_numpy(w)) for w in layer.weights)
    with torch.no_grad():
        ours.weight.copy_(kernel.permute(3, 2, 0, 1))
        ours.bias.copy_(bias)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(4, 6), (5, 7)])
@pytest.mark.parametrize("grad", [False, True])  # the fused bias, and the separate add of a training step
def test_stride2_transposed_conv_crops_as_keras(size, grad):
    torch.manual_seed(0)
    x = torch.randn(2, 5, *size)
    layer = keras.layers.Conv2DTranspose(3, 3, strides=2, padding="same", bias_initializer="random_normal")
    expected = _nchw(layer(x.permute(0, 2, 3, 1).numpy()))
    ours = ConvTranspose2d(5, 3, 3, 2)
    kernel, bias = (torch.from_numpy(keras.ops.convert_to_numpy(w)) for w in layer.weights)
    with torch.no_grad():
        ours.weight.copy_(kernel.permute(3, 2, 0, 1))  # Keras (kh, kw, out, in) -> torch (in, out, kh, kw)
        ours.bias.copy_(bias)
    with torch.set_grad_enabled(grad):
        y = ours(x)
    assert y.shape == (2, 3, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(y.detach(), expected, rtol=1e-5, atol=1e-5)


def test_classifier_starts_as_keras_he_normal_on_a_1x1_transposed_conv():
    torch.manual_seed(0)
    keras.utils.set_random_seed(0)
    # the book's classifier: Conv2DTranspose(n_classes, 1, kernel_initializer="he_normal"), fan-in = n_classes
    keras_std = np.std(keras.ops.convert_to_numpy(keras.initializers.HeNormal()((1, 1, 4, 256))))
    stds = [build_fcn(4, depth=11, n_layers=1).classifier.weight.std().item() for _ in range(4)]
    assert np.mean(stds) == pytest.approx(keras_std, rel=0.06)  # 1024 draws each: sampling error ~2%


def test_keras_adam_takes_the_steps_of_keras_adam():
    """Small gradients: where epsilon matters, torch's own Adam is tens of percent off after a few steps."""
    rng = np.random.default_rng(0)
    start = rng.normal(size=(6, 5)).astype(np.float32)
    grads = [rng.normal(scale=1e-6, size=(6, 5)).astype(np.float32) for _ in range(5)]
    k_var = keras.Variable(start)
    k_adam = keras.optimizers.Adam(learning_rate=1e-3)  # the book's Adam(lr=1e-3): epsilon 1e-7
    results = {}
    for name, cls in (("keras", KerasAdam), ("torch", torch.optim.Adam)):
        p = nn.Parameter(torch.from_numpy(start.copy()))
        opt = cls([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-7)
        steps = []
        for g in grads:
            p.grad = torch.from_numpy(g.copy())
            opt.step()
            steps.append(p.detach().clone())
        results[name] = steps
    for i, g in enumerate(grads):
        k_adam.apply_gradients([(keras.ops.convert_to_tensor(g), k_var)])
        expected = torch.from_numpy(keras.ops.convert_to_numpy(k_var))
        # each step moves a weight by up to 1e-3; float32 rounding of weights of order 1 is 1e-7
        torch.testing.assert_close(results["keras"][i], expected, rtol=0, atol=1e-6)
    moved_torch, moved_keras = (results[n][-1] - torch.from_numpy(start) for n in ("torch", "keras"))
    assert (moved_torch - moved_keras).abs().max() > 0.1 * moved_keras.abs().max()


def test_keras_adam_resumes_its_step_count():
    model = build_fcn(4, depth=11, n_layers=1)
    opt = build_optimizer(model, 1e-3, 1e-4)
    assert isinstance(opt, KerasAdam)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step(), opt.step()
    again = build_optimizer(model, 1e-3, 1e-4)
    again.load_state_dict(opt.state_dict())
    assert [g["keras_step"] for g in again.param_groups] == [2, 2]
    assert isinstance(build_optimizer(model, 1e-3, 1e-4, "torch"), torch.optim.Adam)


def _book_file(tmp_path, size, n_layers, tf2_names=False, seed=0):
    """(Keras model of the book's FCN at ``size`` with random weights, its legacy HDF5 weights file)."""
    keras.utils.set_random_seed(seed)
    keras.layers.Conv2D(1, 1), keras.layers.BatchNormalization()  # the session built layers first: names shift
    model = keras_book.randomise_(keras_book.book_fcn((*size, 3), n_layers=n_layers), seed)
    path = keras_book.save_legacy_h5(model, tmp_path / f"book-{n_layers}layer.h5", tf2_names)
    return model, path


@pytest.mark.parametrize("size, n_layers, tf2_names", [((64, 128), 4, False), ((61, 93), 3, True)])
def test_book_weights_give_keras_logits(tmp_path, size, n_layers, tf2_names):
    """At 61x93 the book's model builds (its 1/4 map is 16x24, its backbone halving odd sides on the way);
    its output is 64x96, whose top-left 61x93 the project's model returns."""
    keras_model, path = _book_file(tmp_path, size, n_layers, tf2_names)
    with h5py.File(path) as f:  # the backbone's layers are named by Keras, their numbers shifted
        names = [n.decode() if isinstance(n, bytes) else n for n in f["ResNet56v2"].attrs["weight_names"]]
    assert "conv2d/kernel" not in [n.removesuffix(":0") for n in names] and any(":0" in n for n in names) == tf2_names
    model = load_keras_fcn(path)
    assert (model.depth, model.n_layers, model.n_classes) == (56, n_layers, 4)
    x = np.random.default_rng(1).random((2, 3, *size), dtype=np.float32)
    expected = torch.from_numpy(keras_book.logits(keras_model, x))[..., :size[0], :size[1]]
    with torch.inference_mode():
        got = model(torch.from_numpy(x))
    assert expected.abs().max() > 0.5  # logits of order 1: an absolute tolerance means something
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_book_weights_at_the_books_size(tmp_path):
    """The book's published run: 3 pyramid layers at 480x640."""
    keras_model, path = _book_file(tmp_path, (480, 640), 3, seed=2)
    x = np.random.default_rng(3).random((1, 3, 480, 640), dtype=np.float32)
    with torch.inference_mode():
        got = load_keras_fcn(path)(torch.from_numpy(x))
    torch.testing.assert_close(got, torch.from_numpy(keras_book.logits(keras_model, x)), rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def book_file(tmp_path_factory):
    return _book_file(tmp_path_factory.mktemp("book"), (64, 64), 3, seed=4)[1]


def test_evaluate_scores_the_book_file_at_480x640(book_file, drinks, tmp_path):
    args = evaluate.get_args_parser().parse_args(["--weights", str(book_file), "--data-path", str(drinks),
                                                  "--limit", "2", "--workers", "0", "--json",
                                                  str(tmp_path / "m.json"), "--figures", "0"])
    metrics = evaluate.main(args)
    assert metrics["n_images"] == 2 and 0 <= metrics["miou"] <= 1 and 0 <= metrics["miou_per_image"] <= 1  # both mIoUs
    assert (tmp_path / "m.json").is_file()


def test_export_releases_the_book_file(book_file, tmp_path):
    args = export.get_args_parser().parse_args(["--weights", str(book_file), "--format", "weights",
                                                "--output", str(tmp_path / "book"), "--data-path",
                                                str(tmp_path / "none"), "--check-images", "1"])
    path = export.main(args)["output"]
    ckpt = load_checkpoint(path)
    assert ckpt["config"]["height"] == 480 and ckpt["config"]["model_options"] == {"depth": 56, "n_layers": 3}
    x = torch.rand(1, 3, 64, 96)
    with torch.inference_mode():
        torch.testing.assert_close(model_from_checkpoint(ckpt, path).eval()(x), load_keras_fcn(book_file)(x))


def test_a_file_of_another_model_is_one_clear_line(tmp_path):
    other = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3), keras.layers.Conv2D(4, 3)])
    path = keras_book.save_legacy_h5(other, tmp_path / "other.h5")
    with pytest.raises(CheckpointError, match=r"other.h5: not the book's FCN \(2 automatically named Conv2D"):
        load_keras_fcn(path)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(CheckpointError, match="text.h5: not a readable Keras HDF5 weights file"):
        load_keras_fcn(tmp_path / "text.h5")


def test_a_missing_layer_is_named(book_file, tmp_path):
    path = tmp_path / "cut.h5"
    path.write_bytes(book_file.read_bytes())
    with h5py.File(path, "r+") as f:
        names = [n for n in f.attrs["layer_names"] if (n.decode() if isinstance(n, bytes) else n) != "tconv_up_x4"]
        f.attrs["layer_names"] = names
    with pytest.raises(CheckpointError, match="cut.h5: has no layer tconv_up_x4"):
        load_keras_fcn(path)
