"""The import-only library below the scripts (train.py, evaluate.py, export.py, benchmark.py, curves.py and
data_generator.py's check). Each module is one concern; none runs anything when imported.

Imports run down this list, never up it, and never in a circle (tests/test_layout.py walks them):

- files (reading and writing files, the errors a user can cause, progress bars), recipes, unet: the leaves
- model_utils.py (devices, precision, seeding, distributed set-up); resnet.py and fcn.py, the card's model files
- registry (models by name), plots, download, losses
- annotations (VIA files to class maps, the split, host-side augmentation, loaders), device_data (the same on
  the device)
- inference (running a model, its metrics), checkpoints (checkpoints, releases, the book's Keras weights),
  onnx_model, profiling (a step's time and FLOPs)
- engine (the training step, schedules, EMA, the compiled step), scoring, tensorboard_log: what train.py and
  evaluate.py share
"""
