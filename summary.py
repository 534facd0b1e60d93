"""Print the book's FCN as the book's ``model.summary()`` shows it: the shape after the stem, each ResNet stage,
each pyramid level and the output, and the parameter counts.

    python summary.py --height 480 --width 640 --depth 56 --n-layers 4
"""
import argparse

import torch

from fcn import build_fcn, count_parameters


def get_args_parser():
    """Flags of the model summary."""
    parser = argparse.ArgumentParser(description="Summary of the FCN / ResNet-v2 model.", add_help=True)
    parser.add_argument("--height", type=int, default=480, help="input height in pixels")
    parser.add_argument("--width", type=int, default=640, help="input width in pixels")
    parser.add_argument("--depth", type=int, default=56, help="ResNet-v2 depth, 9n + 2")
    parser.add_argument("--n-layers", type=int, default=4, help="feature pyramid layers")
    parser.add_argument("--n-classes", type=int, default=4, help="output classes, background included")
    return parser


@torch.inference_mode()
def main(args):
    """Print each stage's, each pyramid level's and the output's shape, and the parameter counts."""
    model = build_fcn(args.n_classes, args.depth, args.n_layers).eval()
    x = torch.zeros(1, 3, args.height, args.width)
    print(f"FCN over ResNet{args.depth}v2, {args.n_layers} pyramid layers, input {tuple(x.shape)}")
    bb = model.backbone
    y = bb.stem(x)
    print(f"  {'stem':<22} {tuple(y.shape)}")
    for i, stage in enumerate(bb.stages):
        y = stage(y)
        print(f"  {f'stage {i} ({len(stage)} units)':<22} {tuple(y.shape)}")
    levels = model.pyramid(bb.final_relu(bb.final_bn(y)))
    for i, level in enumerate(levels):
        print(f"  {f'pyramid level {i}':<22} {tuple(level.shape)}")
    print(f"  {'output (logits)':<22} {tuple(model(x).shape)}")
    trainable, running = count_parameters(model)
    print(f"Trainable parameters: {trainable:,}")
    print(f"BatchNorm running statistics: {running:,}")
    print(f"L2-regularised parameters: {sum(p.numel() for p in model.l2_parameters()):,}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
