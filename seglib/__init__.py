"""The import-only library below the scripts (train.py, evaluate.py, export.py, benchmark.py, curves.py and
data_generator.py's check). Each module has one job; none runs anything when imported.

Imports run down this list, never up it, and never in a circle (tests/test_layout.py walks them):

- errors, files, via, joint_transforms, schedules, ema, metrics, unet: the leaves (they import at most errors
  and files)
- resnet.py, fcn.py (the card's model files, on top for the reader), then registry: models by name
- plots, download, model_utils.py (checkpoints, devices, precision, seeding, distributed set-up)
- data_generator.py (the card's data module), inference, flops, onnx_model
- engine, scoring: what train.py and evaluate.py share
"""
