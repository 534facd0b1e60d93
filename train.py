"""Train the book's FCN (ResNet56-v2, 4-layer feature pyramid), or another registered model, on the drinks dataset.

Defaults are the book's recipe: 480x640 input, batch 4, 100 epochs, Adam at 1e-3 with the book's step schedule,
cross-entropy, L2 1e-4 on the backbone's conv kernels. Each epoch is scored on a validation split of the
training annotations; the best epoch is scored on the test split at the end.

    python train.py                                   # the book's recipe, on a GPU
    python train.py --resume                          # continue weights/<run>/last.pt
    python train.py --recipe cpu                      # the CPU recipe: about half an hour on 2 cores
    python train.py --recipe cpu-fast                 # the same cut to 5 epochs: 9 minutes there, lower mIoU
    python train.py --recipe cpu --model lraspp_mobilenet_v3_large --epochs 40    # another model (seglib/registry.py)
    torchrun --nproc_per_node=4 train.py --sync-bn    # several GPUs
"""
import argparse
import copy
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import distributed as dist

from data_generator import default_data_path, load_annotations, make_dataset
from model_utils import (
    DistInfo,
    amp_dtype,
    barrier,
    broadcast_buffers,
    default_workers,
    init_distributed,
    keep_freed_memory,
    make_grad_scaler,
    restore_grad_scaler,
    seed_everything,
    set_rng_state,
)
from resnet import L2_WEIGHT, zero_init_residual_
from seglib.annotations import AUGMENTATIONS
from seglib.checkpoints import (
    BackgroundWriter,
    check_resume,
    checkpoint_state,
    host_copy,
    load_checkpoint,
    load_resumed_weights,
    save_checkpoint,
    save_job,
    trim_metrics,
)
from seglib.device_data import DeviceTrainLoader, build_loaders
from seglib.download import ensure_data
from seglib.engine import (
    BASE_LR,
    COMPILE_MODES,
    SCHEDULES,
    LossFunction,
    ModelEMA,
    StopRequest,
    Trainer,
    build_optimizer,
    check_weights_agree,
    estimate_cpu_run,
    learning_rate,
    load_compile_cache,
    save_compile_cache,
    train_one_epoch,
)
from seglib.files import TrainingError, UsageError, append_jsonl, at_least, check_flags, run_cli, write_json
from seglib.inference import TTA_MODES, evaluate_model
from seglib.losses import LOSSES, Criterion, build_criterion, resolve_class_weights
from seglib.plots import plot_curves
from seglib.recipes import (
    CPU_COMMAND,
    RECIPES,
    RecipeArgumentParser,
    class_weights,
    ema_decay,
    epoch_size,
    progressive_step,
    recipe_flags,
    seconds_left,
    sizes_from,
)
from seglib.registry import (
    MODELS,
    build_model,
    check_same_padding,
    checkpoint_model,
    load_backbone_,
    model_options,
    read_backbone_weights,
    run_name,
)
from seglib.scoring import evaluate_checkpoint
from seglib.tensorboard_log import TensorBoardLog, tensorboard_available


def default_run_name(args):
    """A name built from the model and the recipe, e.g. ``fcn-resnet56v2-4layer-drinks`` (``...-cpu``)."""
    name = f"{run_name(args.model, model_options(args.model, args))}-drinks"
    return f"{name}-{args.recipe}" if args.recipe else name


def get_args_parser():
    """Flags of train.py, in groups; defaults are the book's recipe."""
    p = RecipeArgumentParser(
        description="Train the book's FCN / ResNet-v2, or another registered model, on the drinks dataset.")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=default_data_path(),
                   help="dataset folder (default: $DRINKS_DATA or dataset/drinks, downloaded when missing)")
    g.add_argument("--height", type=int, default=480, help="input height the images are resized to (the book: 480)")
    g.add_argument("--width", type=int, default=640, help="input width the images are resized to (the book: 640)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="share of the training images held out to validate")
    g.add_argument("--split-seed", type=int, default=0,
                   help="seed of which images are held out (default 0 for every --seed: one validation split)")
    g.add_argument("--limit", type=int, default=None, help="use only the first N training images (smoke runs)")
    g.add_argument("--augment", choices=AUGMENTATIONS, default="full",
                   help="full (flip, scale-crop, colour jitter), flip (only), none (resize: the book's pipeline)")
    g.add_argument("--no-augment", dest="augment", action="store_const", const="none", help="same as --augment none")
    g.add_argument("--flips", choices=("random", "alternate"), default="random",
                   help="horizontal flips: random each epoch, or alternate (each image mirrored every other epoch)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="fcn_resnet56v2", choices=MODELS,
                   help="model to train (seglib/registry.py): " + "; ".join(f"{k}: {v.about}" for k, v in MODELS.items()))
    g.add_argument("--depth", type=int, default=56, help="ResNet-v2 depth, 9n + 2 (fcn_resnet56v2 only)")
    g.add_argument("--n-layers", type=int, default=4,
                   help="feature pyramid layers (fcn_resnet56v2 only; the book's published run used 3)")
    g.add_argument("--pretrained-backbone", default=None, metavar="PATH|imagenet",
                   help="start the backbone from a state_dict file or torchvision's ImageNet weights (default: none)")

    g = p.add_argument_group("recipe and optimisation")
    g.add_argument("--recipe", default=None, choices=RECIPES,
                   help="a named recipe setting the defaults of its flags (explicit flags win); "
                        + "; ".join(f"{name}: {recipe_flags(name)}" for name in RECIPES) + " (default: the book's)")
    g.add_argument("--epochs", type=int, default=100, help="total epochs (the book: 100)")
    g.add_argument("--batch-size", type=int, default=4, help="images per step and per process (the book: 4)")
    g.add_argument("--lr", type=float, default=BASE_LR, help="base learning rate (the book: 1e-3)")
    g.add_argument("--lr-schedule", default="book", choices=SCHEDULES,
                   help="book: x0.5 after epoch 40, x0.1 after 60, x0.05 after 80; scaled: the same at 40%%, 60%%, "
                        "80%% of --epochs; cosine; poly: (1 - t) ** 0.9")
    g.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warmup of the rate, in epochs (the book: 0)")
    g.add_argument("--adam-eps", default="keras", choices=("keras", "torch"),
                   help="Adam's epsilon added before the bias correction (keras, the book's) or after it (torch)")
    g.add_argument("--l2", type=float, default=L2_WEIGHT, help="L2 coefficient on the backbone's kernels (the book: 1e-4)")
    g.add_argument("--seed", type=int, default=0, help="seed of the weights, the data order and the augmentation")
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels (bitwise-reproducible runs)")

    g = p.add_argument_group("levers beyond the book (off by default)")
    g.add_argument("--loss", default="ce", choices=LOSSES,
                   help="ce (the book's cross-entropy), dice, lovasz, or ce plus --loss-weight times dice or lovasz")
    g.add_argument("--loss-weight", type=float, default=1.0, help="weight of the Dice or Lovász term of ce+dice, ce+lovasz")
    g.add_argument("--class-weights", type=class_weights, default="none", metavar="none|auto|W0,W1,...",
                   help="cross-entropy class weights: none (the book), auto (median frequency) or one per class")
    g.add_argument("--progressive", type=progressive_step, nargs="*", default=[], metavar="HxW:UNTIL",
                   help="train at HxW until that fraction of the epochs, then at the next size (e.g. 64x96:0.5); "
                        "no step: off")
    g.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction, default=False,
                   help="start each bottleneck unit as the identity (its last conv kernel zero)")
    g.add_argument("--ema", type=ema_decay, default=0.0, metavar="DECAY",
                   help="validate, keep and test an EMA of the weights with this decay per step (0: off)")
    g.add_argument("--tta", default="none", choices=TTA_MODES,
                   help="test-time augmentation of validation and test: flip, scales (1, 1.25, 1.5), flip+scales")
    g.add_argument("--val-tta", default=None, choices=TTA_MODES, help="test-time augmentation of validation only")

    g = p.add_argument_group("speed")
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    g.add_argument("--workers", type=int, default=default_workers(),
                   help="loader worker processes per process (default: the cores, at most 8)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast where supported, fp16 with loss scaling on older GPUs (--no-amp: float32)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format (faster convolutions)")
    g.add_argument("--compile", action="store_true", help="torch.compile the forward pass and loss, once per size")
    g.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --compile")
    g.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode: reduce-overhead replays the step as CUDA graphs")
    g.add_argument("--compile-cache", default=None, metavar="FILE",
                   help="load and save torch.compile's portable cache in FILE (torch >= 2.7)")
    g.add_argument("--data-on-device", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the decoded images on the device and augment them there (default: on for CUDA "
                        "when they fit in a quarter of its free memory)")
    g.add_argument("--save-in-background", action=argparse.BooleanOptionalAction, default=None,
                   help="write checkpoints and curves from a background thread (default: on for CUDA)")

    g = p.add_argument_group("outputs")
    g.add_argument("--run-name", default=None, help="the run's folder name (default: built from the model and recipe)")
    g.add_argument("--output-dir", default="weights", help="checkpoints and logs go to <output-dir>/<run-name>")
    g.add_argument("--figures-dir", default="figures", help="figures go to <figures-dir>/<run-name>")
    g.add_argument("--resume", action="store_true", help="continue from <output-dir>/<run-name>/last.pt")
    g.add_argument("--save-every", type=int, default=1, metavar="N",
                   help="write last.pt every N epochs and at the last (best.pt whenever validation improves)")
    g.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard under <run dir>/tb/")
    g.add_argument("--no-test", dest="test", action="store_false", help="skip the final test-split evaluation")

    g = p.add_argument_group("distributed (torchrun)")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes")
    return p


def resolve_args(args):
    """Fill in defaults that depend on other flags; returns a new Namespace."""
    args = copy.copy(args)
    args.run_name = args.run_name or default_run_name(args)
    return args


def check_args(args):
    """UsageError, naming the flag and its value, for a value the run cannot use; before anything is written."""
    name = args.run_name
    if name is not None and (name in ("", ".", "..") or Path(name).name != name or "\\" in name):
        raise UsageError(f"--run-name {args.run_name}: a run name is one folder name, written inside --output-dir "
                         f"and --figures-dir (no / or \\, not . or ..)")
    check_flags(args, [
        at_least("--epochs", 1), at_least("--batch-size", 1),
        at_least("--height", 32, "the model downsamples 32 times"),
        at_least("--width", 32, "the model downsamples 32 times"),
        at_least("--workers", 0), at_least("--lr", 0), at_least("--l2", 0), at_least("--warmup-epochs", 0),
        at_least("--limit", 1), at_least("--loss-weight", 0), at_least("--save-every", 1),
        ("--val-fraction", lambda v: 0 < v < 1, "between 0 and 1, both excluded (the run needs training and "
                                                 "validation images)")])
    if args.tensorboard and not tensorboard_available():
        raise UsageError("--tensorboard: the tensorboard package is not installed (pip install tensorboard)")
    if args.flips == "alternate" and args.augment == "none":
        raise UsageError("--flips alternate: flips need --augment flip or full (--augment none has none)")
    untils = [step[2] for step in args.progressive]
    if untils != sorted(set(untils)):
        raise UsageError(f"--progressive {' '.join(f'{h}x{w}:{u}' for h, w, u in args.progressive)}: the UNTIL "
                         f"fractions must increase from step to step")


@dataclass
class Run:
    """A training run as ``setup`` builds it: its flags, places, data, trainer and where it starts."""

    args: argparse.Namespace
    info: DistInfo
    trainer: Trainer
    run_dir: Path
    fig_dir: Path
    data_path: Path
    class_names: list
    val_set: object
    train_loader: object
    val_loader: object
    steps_per_epoch: int = 0  # taken before a resumed epoch's skip shortens the loader
    start_epoch: int = 0
    start_step: int = 0
    best: float = -1.0
    tb: TensorBoardLog | None = None
    estimated: dict | None = None  # (height, width): the CPU estimate's seconds of an epoch at that size
    measured: dict = field(default_factory=dict)  # (height, width): seconds of the latest epoch at that size

    @property
    def last_path(self):
        return self.run_dir / "last.pt"

    @property
    def best_path(self):
        return self.run_dir / "best.pt"

    @property
    def metrics_path(self):
        return self.run_dir / "metrics.jsonl"


def main(args):
    """Train, validate every epoch, keep last.pt and best.pt, and score best.pt on the test split."""
    started = time.perf_counter()  # the CPU estimate counts the start-up in the run's time
    check_args(args)
    keep_freed_memory()
    args = resolve_args(args)
    info, device = init_distributed(args.device)
    try:
        return train(setup(args, info, device, started))
    finally:
        if info.distributed:
            dist.destroy_process_group()


def train(run):
    """The epoch loop: train, validate, log and save each epoch; then score best.pt on the test split."""
    args, t, main_rank = run.args, run.trainer, run.info.is_main
    threaded = t.device.type == "cuda" if args.save_in_background is None else args.save_in_background
    # the log closes after the writer has run its last jobs (the last epoch's figure goes into the log)
    with StopRequest() as stop, (run.tb or nullcontext()), BackgroundWriter(threaded=threaded) as writer:
        for epoch in range(run.start_epoch, args.epochs):
            start_step = run.start_step if epoch == run.start_epoch else 0
            size = epoch_size(args.progressive, epoch, args.epochs, (args.height, args.width))
            run.train_loader.sampler.set_epoch(epoch)
            run.train_loader.sampler.size = size
            run.train_loader.sampler.alternate_flips = args.flips == "alternate"
            run.train_loader.sampler.skip = start_step * args.batch_size
            t0 = time.perf_counter()
            step, stopped = train_one_epoch(t, run.train_loader, epoch, args.epochs, _lr_fn(run, epoch), stop,
                                            start_step, _log_fn(run, epoch))
            if stopped:
                if main_rank:
                    writer.wait()  # an older last.pt still being written must not land after this one
                    save_checkpoint(_state(run, epoch, step), run.last_path)
                    print(f"saved {run.last_path} at epoch {epoch + 1} step {step}; continue with --resume")
                return None
            scored = t.model if t.ema is None else t.ema.module  # the weights validated, kept and tested
            val = validate(run, scored)
            record = {"epoch": epoch + 1, "train_loss": (t.loss_state[0] / t.loss_state[1]).item(),
                      "lr": _lr_fn(run, epoch)(0), "size": list(size), "seconds": round(time.perf_counter() - t0, 2),
                      "time": round(time.time(), 3),
                      "train_images": run.steps_per_epoch * args.batch_size * run.info.world_size,
                      "val": {k: v for k, v in val.items() if k != "per_class"},
                      "val_iou_per_class": [r["iou"] for r in val["per_class"]]}
            t.loss_state.zero_()
            improved = val["miou_per_image"] > run.best
            run.best = max(run.best, val["miou_per_image"])
            if main_rank:
                append_jsonl(run.metrics_path, record)
                writer.submit(*_epoch_jobs(run, epoch, record, improved, scored, writer.threaded))
                if t.loss_fn is not None and args.compile_cache and t.loss_fn.take_new_graphs():
                    save_compile_cache(args.compile_cache)
                report_epoch(run, record, improved, resumed_partial=epoch == run.start_epoch and run.start_step > 0)
    check_weights_agree(t.model, main_rank)
    barrier(t.device)
    if main_rank and args.test and run.best_path.exists():
        return evaluate_checkpoint(run.best_path, run.data_path, "test", args.batch_size, args.workers,
                                   str(t.device), args.amp, args.channels_last, run.run_dir / "test_metrics.json",
                                   figures_dir=run.fig_dir, tta=args.tta)
    return None


def _lr_fn(run, epoch):
    """The learning rate of each step of ``epoch``, a pure function of the global step."""
    a, n = run.args, run.steps_per_epoch
    return lambda step: learning_rate(a.lr_schedule, epoch * n + step, n, a.epochs, a.lr, a.warmup_epochs)


def _log_fn(run, epoch):
    """TensorBoard's per-step logger for ``epoch`` (None without --tensorboard)."""
    if run.tb is None:
        return None
    return lambda step, loss, lr: run.tb.step(epoch * run.steps_per_epoch + step, loss, lr)


def _state(run, epoch, step):
    """What last.pt and best.pt hold at ``step`` of ``epoch`` (seglib.checkpoints.checkpoint_state)."""
    t = run.trainer
    return checkpoint_state(t.model, t.optimizer, t.scaler, run.args, run.class_names, epoch, step, run.best,
                            t.loss_state, t.ema)


def validate(run, model):
    """Metrics of ``model`` on the validation split, summed over the processes."""
    t = run.trainer
    broadcast_buffers(model)
    metrics, _ = evaluate_model(model, run.val_loader, t.device, len(run.class_names), t.dtype, t.channels_last,
                                tta=run.args.val_tta or run.args.tta)
    metrics.all_reduce()
    return metrics.compute(run.class_names)


def _epoch_jobs(run, epoch, record, improved, scored, threaded):
    """The writer's jobs after an epoch: best.pt and last.pt as due, the curves, TensorBoard's epoch."""
    args, t = run.args, run.trainer
    due = (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs
    # the snapshot is taken here, on this thread; the disk and the figure are the writer's
    state = _state(run, epoch + 1, 0) if improved or due else None
    state = host_copy(state) if threaded and state else state
    jobs = [save_job(state, run.best_path if improved else None, run.last_path if due else None),
            lambda: plot_curves(run.metrics_path, run.fig_dir / "curves.png")]
    if run.tb is not None:  # the scalars now; the figure of this epoch's predictions with the files
        jobs.append(run.tb.epoch((epoch + 1) * run.steps_per_epoch, record, run.class_names, scored, run.val_set,
                                 t.device, t.dtype, args.channels_last))
    return jobs


def report_epoch(run, record, improved, resumed_partial):
    """Print the epoch's line, with the time left (from the epochs so far and the CPU estimate)."""
    args, size = run.args, tuple(record["size"])
    if not resumed_partial:  # a resumed partial epoch is no epoch's time
        run.measured[size] = record["seconds"]
    left = seconds_left(run.measured, args.progressive, record["epoch"], args.epochs, (args.height, args.width),
                        run.estimated)
    val = record["val"]
    print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, val mIoU per image "
          f"{val['miou_per_image']:.4f}, val mIoU {val['miou']:.4f}{'  (best)' if improved else ''}, "
          f"{record['seconds']:.0f} s" + (f", about {left / 60:.1f} min left" if left else ""))


# ------------------------------------------------------------------------------------------------------- set-up

def setup(args, info, device, started):
    """Everything the epoch loop needs, checked before anything is written: the data, the model, the trainer,
    the state a resumed run continues from, config.json, and on the CPU the time estimate."""
    seed_everything(args.seed, args.deterministic)
    run_dir, fig_dir = Path(args.output_dir) / args.run_name, Path(args.figures_dir) / args.run_name
    ckpt = _resumed_checkpoint(args, run_dir / "last.pt")
    # each node's first process readies its own copy (nodes need not share a filesystem); the others wait
    data_path = ensure_data(args.data_path) if info.local_rank == 0 else Path(args.data_path)
    barrier(device)
    train_set, class_names = make_dataset(data_path, "train", args.height, args.width, args.augment,
                                          args.val_fraction, args.split_seed, args.limit, workers=args.workers,
                                          random_flip=args.flips == "random")
    if ckpt is not None and list(ckpt["config"]["class_names"]) != list(class_names):
        raise UsageError(f"--data-path {args.data_path}: its classes {class_names} are not those of "
                         f"{run_dir / 'last.pt'} ({ckpt['config']['class_names']})")
    val_set, _ = make_dataset(data_path, "val", args.height, args.width, False, args.val_fraction, args.split_seed,
                              workers=args.workers)
    train_loader, val_loader = build_loaders(args, train_set, val_set, device, info)
    if len(train_loader) == 0:
        raise UsageError(f"--batch-size {args.batch_size}: {len(train_set)} training images give no full batch of "
                         f"{args.batch_size} per process")
    weights = resolve_class_weights(args.class_weights, train_set, class_names)
    model = _model(args, len(class_names), ckpt, run_dir / "last.pt").to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = amp_dtype(device, args.amp)
    if info.is_main:  # every check has passed: only now is anything written
        _write_config(args, run_dir, device, dtype, info, isinstance(train_loader, DeviceTrainLoader))
    criterion = build_criterion(args.loss, None if weights is None else weights.to(device), args.loss_weight)
    trainer = _trainer(args, info, device, dtype, model, criterion, ckpt, run_dir / "last.pt")
    run = Run(args, info, trainer, run_dir, fig_dir, data_path, class_names, val_set, train_loader, val_loader,
              steps_per_epoch=len(train_loader))
    if ckpt is not None:
        run.start_epoch, run.start_step, run.best = ckpt["epoch"], ckpt["step"], ckpt["best_miou"]
        if info.is_main:
            print(f"resumed {run.last_path}: epoch {run.start_epoch + 1}, step {run.start_step}, best val mIoU "
                  f"{run.best:.4f}")
    if info.is_main:  # a run killed before its first last.pt starts again: its metrics lines go too
        trim_metrics(run.metrics_path, run.start_epoch)
    if device.type == "cpu" and info.is_main and run.start_epoch < args.epochs and args.limit is None:
        run.estimated = _announce_cpu_estimate(run, model, len(train_set), len(val_set), weights, started)
    if args.tensorboard and info.is_main:
        # from the step after the checkpoint on, whatever an interrupted run logged goes (TensorBoard's purge)
        run.tb = TensorBoardLog(run_dir / "tb",
                                purge_step=run.start_epoch * run.steps_per_epoch + run.start_step + 1)
    return run


def _resumed_checkpoint(args, last_path):
    """last.pt when --resume continues it (checked against this run's flags), else None."""
    if last_path.exists() and not args.resume:
        raise TrainingError(f"{last_path} exists: pass --resume to continue that run, or choose another --run-name")
    if not (args.resume and last_path.exists()):
        return None
    # loaded onto the CPU: load_state_dict copies weights and optimizer state to the model's device, and the RNG
    # states must be CPU tensors whatever device the run trains on
    ckpt = load_checkpoint(last_path)
    wanted = (args.model, model_options(args.model, args))
    if checkpoint_model(ckpt["config"]) != wanted:
        raise TrainingError(f"{last_path} holds {checkpoint_model(ckpt['config'])}, not this run's {wanted}: "
                            f"resume with the same model flags")
    check_same_padding(ckpt["config"], last_path)
    check_resume(args, ckpt, last_path)
    return ckpt


def _model(args, n_classes, ckpt, last_path):
    """The model to train, on the CPU: resumed weights, a pretrained backbone, or the book's initialisation."""
    model = build_model(args.model, n_classes, **model_options(args.model, args))
    if args.zero_init_residual and zero_init_residual_(model) == 0:
        raise UsageError(f"--zero-init-residual: --model {args.model} has no ResNet-v2 bottleneck units")
    if args.pretrained_backbone and ckpt is None:
        state = read_backbone_weights(args.model, args.pretrained_backbone)
        load_backbone_(model, args.model, state, args.pretrained_backbone)
    if ckpt is not None:  # before anything is written: weights that do not fit leave the run's files as they were
        load_resumed_weights(model, ckpt["model"], last_path)
    return model


def _write_config(args, run_dir, device, dtype, info, on_device):
    """Print the resolved flags and write them, with what the run resolved, to config.json."""
    print(json.dumps(vars(args), indent=2))
    print(f"device: {device}, autocast: {dtype}, processes: {info.world_size}, data: "
          + ("on the device" if on_device else f"{args.workers} loader workers"))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json({**vars(args), "device": str(device), "autocast": str(dtype), "world_size": info.world_size,
                "data_on_device": on_device}, run_dir / "config.json")


def _trainer(args, info, device, dtype, model, criterion, ckpt, last_path):
    """The Trainer: optimizer, scaler, EMA and loss state (restored when resuming), DDP and the compiled step."""
    optimizer = build_optimizer(model, args.lr, args.l2, args.adam_eps)
    scaler = make_grad_scaler(device, dtype)
    loss_state = torch.zeros(2, dtype=torch.float64, device=device)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        restore_grad_scaler(scaler, ckpt["scaler"])
        loss_state = ckpt["loss_state"].to(device)
        set_rng_state(ckpt["rng"])
    ema = ModelEMA(model, args.ema) if args.ema else None
    if ema is not None and ckpt is not None and "ema" in ckpt:
        ema.load_state_dict(ckpt["ema"])
    if args.sync_bn and info.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    trained = model
    if info.distributed:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = None
    if args.compile:
        if args.compile_cache and load_compile_cache(args.compile_cache) and info.is_main:
            print(f"loaded the compile cache {args.compile_cache}")
        loss_fn = LossFunction(trained, criterion, dtype, args.compile_backend, args.compile_mode)
    return Trainer(model, criterion, optimizer, scaler, device, dtype, args.channels_last, trained, loss_fn, ema,
                   info.is_main, info.world_size, last_path, loss_state)


def _announce_cpu_estimate(run, model, n_train, n_val, weights, started):
    """Print the CPU run's estimated time; returns the estimate's seconds of an epoch by size."""
    args = run.args
    n_test = len(load_annotations(run.data_path, "test")) if args.test else 0
    minutes, estimated = estimate_cpu_run(model, args, run.trainer.dtype, n_train, n_val,
                                          Criterion(args.loss, weights, args.loss_weight), n_test,
                                          time.perf_counter() - started, len(run.class_names), run.start_epoch)
    sizes = " then ".join(f"{h}x{w}" for h, w in sizes_from(args.progressive, run.start_epoch, args.epochs,
                                                            (args.height, args.width)))
    what = (f"rest of the run (the last {args.epochs - run.start_epoch} of {args.epochs} epochs" if run.start_epoch
            else f"whole run ({args.epochs} epochs")
    print(f"no GPU: training on the CPU. Estimated time of the {what} of {n_train} images at {sizes}, "
          f"validation{', the test split' if n_test else ''}): {minutes:.0f} min. The CPU recipe (README.md gives "
          f"its time by CPU): {CPU_COMMAND}")
    return estimated


if __name__ == "__main__":
    run_cli(main, get_args_parser())
