"""The book's FCN built with Keras itself (Keras 3 on its torch backend), as chapter 12's Keras code lays it out,
for tests that hold the project's model against it: the same layers, in the same order, with the same names
(Keras's automatic ``conv2d_K`` / ``batch_normalization_K`` in the backbone, a nested model; the book's own
names in the pyramid and the head), so that its weights file has the book's layout.

Import this module before anything else imports keras: it selects the torch backend.
"""
import os

os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported: the tests run without TensorFlow

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402


def _conv_bn_relu(x, filters, strides, name):
    """The book's conv_layer: Conv2D(3x3, 'same', he_normal), BN, ReLU, named conv_/bn_/relu_ + name."""
    x = layers.Conv2D(filters, 3, strides=strides, padding="same", kernel_initializer="he_normal",
                      name="conv_" + name)(x)
    x = layers.BatchNormalization(name="bn_" + name)(x)
    return layers.Activation("relu", name="relu_" + name)(x)


def _unit_layer(x, filters, kernel_size=3, strides=1, bn_relu=True, conv_first=False):
    """The book's resnet_layer: the Conv2D is made before the BatchNormalization, whichever runs first."""
    conv = layers.Conv2D(filters, kernel_size, strides=strides, padding="same", kernel_initializer="he_normal",
                         kernel_regularizer=keras.regularizers.l2(1e-4))
    if conv_first:
        return layers.Activation("relu")(layers.BatchNormalization()(conv(x)))
    if bn_relu:
        x = layers.Activation("relu")(layers.BatchNormalization()(x))
    return conv(x)


def book_backbone(input_shape, depth=56, n_layers=3):
    """The book's ResNet-v2 with its features pyramid, a nested model named ``ResNet{depth}v2``."""
    n = (depth - 2) // 9
    inputs = keras.Input(shape=input_shape)
    x = _unit_layer(inputs, 16, conv_first=True)
    width = 16
    for stage in range(3):
        out = width * 4 if stage == 0 else width * 2
        for unit in range(n):
            strides = 2 if stage > 0 and unit == 0 else 1
            y = _unit_layer(x, width, 1, strides, bn_relu=not (stage == 0 and unit == 0))
            y = _unit_layer(y, width)
            y = _unit_layer(y, out, 1)
            if unit == 0:  # the projection shortcut, made after the unit's three convs
                x = _unit_layer(x, out, 1, strides, bn_relu=False)
            x = layers.Add()([x, y])
        width = out
    x = layers.Activation("relu")(layers.BatchNormalization()(x))
    levels = [x, layers.AveragePooling2D(2, name="pool1")(x)]
    for i in range(n_layers - 1):
        levels.append(_conv_bn_relu(levels[-1], 512, 2, f"_layer{i + 2}"))
    return keras.Model(inputs, levels, name=f"ResNet{depth}v2")


def book_fcn(input_shape, depth=56, n_layers=3, n_classes=4):
    """The book's FCN (its build_fcn): returns the softmax model, whose ``pre_activation`` layer gives logits."""
    inputs = keras.Input(shape=input_shape)
    levels = book_backbone(input_shape, depth, n_layers)(inputs)
    features = [levels[0]]
    for i, level in enumerate(levels[1:]):
        name = f"fcn_{8 * 2 ** i}"
        y = _conv_bn_relu(level, 256, 1, name)
        features.append(layers.UpSampling2D(2 ** (i + 1), interpolation="bilinear", name=name + "_up2d")(y))
    x = layers.Concatenate()(features)
    for name in ("up_x2", "up_x4"):
        x = layers.Conv2DTranspose(256, 3, strides=2, padding="same", kernel_initializer="he_normal",
                                   name="tconv_" + name)(x)
        x = layers.Activation("relu", name="relu_" + name)(layers.BatchNormalization(name="bn_" + name)(x))
    x = layers.Conv2DTranspose(n_classes, 1, padding="same", kernel_initializer="he_normal",
                               name="pre_activation")(x)
    return keras.Model(inputs, layers.Softmax(name="segmentation")(x), name="fcn")


def randomise_(model, seed=0):
    """Give every bias and BatchNorm entry random values (Keras starts them at 0 and 1, which would hide a swap)."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        name = v.path.split("/")[-1]
        shape = tuple(v.shape)
        if name in ("bias", "beta", "moving_mean"):
            v.assign(rng.normal(0, 0.1, shape).astype("float32"))
        elif name == "moving_variance":
            v.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))
        elif name == "gamma":  # small scales keep 56 layers' activations, and so the logits, of order 1
            v.assign(rng.uniform(0.1, 0.3, shape).astype("float32"))
    return model


def logits(model, images):
    """The book's FCN's pre-softmax output for NCHW float images, as an NCHW numpy array (inference mode)."""
    head = keras.Model(model.inputs, model.get_layer("pre_activation").output)
    out = head(np.ascontiguousarray(images.transpose(0, 2, 3, 1)), training=False)
    return keras.ops.convert_to_numpy(out).transpose(0, 3, 1, 2)


def save_legacy_h5(model, path, tf2_names=False):
    """Write ``model``'s weights as Keras's legacy HDF5 weights file (``model.save_weights('x.h5')`` of Keras 2
    and TensorFlow 2). ``tf2_names`` writes TensorFlow 2's weight names (``conv2d_3/kernel:0``) instead of Keras
    3's (``conv2d_3/kernel``)."""
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    if tf2_names:
        with h5py.File(path, "r+") as f:
            for layer in f.attrs["layer_names"]:
                group = f[layer]
                names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]]
                for name in names:
                    group.move(name, name + ":0")
                group.attrs["weight_names"] = [(n + ":0").encode() for n in names]
    return path
