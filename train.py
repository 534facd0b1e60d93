"""Train the book's FCN (ResNet56-v2, 4-layer feature pyramid), or another registered model, on the drinks dataset.

Defaults are the book's recipe: 480x640 input, batch 4, 100 epochs, Adam at 1e-3 with the book's step schedule,
cross-entropy, L2 1e-4 on the backbone's conv kernels. Each epoch is scored on a validation split of the
training annotations; the best epoch is scored on the test split at the end.

    python train.py                                   # the book's recipe, on a GPU
    python train.py --resume                          # continue weights/<run>/last.pt
    python train.py --recipe cpu                      # the CPU recipe: 26 minutes on 2 Zen 4 cores
    python train.py --recipe cpu-fast                 # the same cut to 5 epochs: 9 minutes there, lower mIoU
    python train.py --recipe cpu --model lraspp_mobilenet_v3_large --epochs 40    # another model (seglib/registry.py)
    torchrun --nproc_per_node=4 train.py --sync-bn    # several GPUs
"""
import argparse
import copy
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import distributed as dist

from data_generator import default_data_path, load_annotations, make_dataset
from model_utils import (amp_dtype, barrier, broadcast_buffers, default_workers, init_distributed, keep_freed_memory,
                         make_grad_scaler, restore_grad_scaler, seed_everything, set_rng_state)
from seglib.checkpoints import (BackgroundWriter, check_resume, checkpoint_state, host_copy, load_checkpoint,
                                load_resumed_weights, save_checkpoint, save_job, trim_metrics)
from resnet import L2_WEIGHT, zero_init_residual_
from seglib.engine import (BASE_LR, COMPILE_MODES, SCHEDULES, LossFunction, ModelEMA, StopRequest, build_optimizer,
                           check_weights_agree, estimate_cpu_run, learning_rate, load_compile_cache, save_compile_cache,
                           train_one_epoch)
from seglib.device_data import DeviceTrainLoader, build_loaders
from seglib.download import ensure_data
from seglib.files import TrainingError, UsageError, append_jsonl, at_least, check_flags, run_cli, write_json
from seglib.inference import TTA_MODES, evaluate_model
from seglib.annotations import AUGMENTATIONS
from seglib.losses import LOSSES, Criterion, build_criterion, resolve_class_weights
from seglib.plots import plot_curves
from seglib.recipes import (CPU_COMMAND, RECIPES, RecipeArgumentParser, class_weights, ema_decay, epoch_size,
                            progressive_step, recipe_flags, seconds_left, sizes_from)
from seglib.registry import (MODELS, build_model, check_same_padding, checkpoint_model, load_backbone_, model_options,
                             read_backbone_weights, run_name)
from seglib.scoring import evaluate_checkpoint
from seglib.tensorboard_log import TensorBoardLog, tensorboard_available


def default_run_name(args):
    """A name built from the model and the recipe, e.g. ``fcn-resnet56v2-4layer-drinks`` (``...-cpu``)."""
    name = f"{run_name(args.model, model_options(args.model, args))}-drinks"
    return f"{name}-{args.recipe}" if args.recipe else name


def get_args_parser():
    """Flags of train.py; defaults are the book's recipe."""
    p = RecipeArgumentParser(
        description="Train the book's FCN / ResNet-v2, or another registered model, on the drinks dataset.")
    p.add_argument("--recipe", default=None, choices=RECIPES,
                   help="a named recipe that sets the defaults of its flags (explicit flags still win); "
                        + "; ".join(f"{name}: {recipe_flags(name)}" for name in RECIPES)
                        + " (default: none, the book's recipe)")
    p.add_argument("--data-path", default=default_data_path(),
                   help="dataset folder (default: $DRINKS_DATA or dataset/drinks, downloaded when missing)")
    p.add_argument("--epochs", type=int, default=100, help="total epochs (the book: 100)")
    p.add_argument("--batch-size", type=int, default=4, help="images per step and per process (the book: 4)")
    p.add_argument("--lr", type=float, default=BASE_LR, help="base learning rate of the book's schedule")
    p.add_argument("--adam-eps", default="keras", choices=("keras", "torch"),
                   help="where Adam adds its epsilon of 1e-7: keras, before the bias correction as the book's Keras "
                        "Adam does; torch, after it")
    p.add_argument("--lr-schedule", default="book", choices=SCHEDULES,
                   help="book: x0.5 after epoch 40, x0.1 after 60, x0.05 after 80; scaled: the same steps at "
                        "40%%, 60%%, 80%% of --epochs (for short runs); cosine: half a cosine down to 0; "
                        "poly: (1 - t) ** 0.9 (torchvision's references, MMSegmentation); set every step")
    p.add_argument("--warmup-epochs", type=float, default=0.0,
                   help="linear warmup of the rate over this many epochs (may be fractional; the book: 0)")
    p.add_argument("--l2", type=float, default=L2_WEIGHT, help="the book's L2 coefficient on the backbone's kernels")
    p.add_argument("--height", type=int, default=480, help="input height the images are resized to")
    p.add_argument("--width", type=int, default=640, help="input width the images are resized to")
    p.add_argument("--model", default="fcn_resnet56v2", choices=MODELS,
                   help="model to train (seglib/registry.py): " + "; ".join(f"{k}: {v.about}" for k, v in MODELS.items()))
    p.add_argument("--pretrained-backbone", default=None, metavar="PATH|imagenet",
                   help="start the backbone from a local state_dict file (the backbone's or its ImageNet "
                        "classifier's), or from torchvision's ImageNet weights (imagenet: downloads; not for "
                        "fcn_resnet56v2 or unet) (default: none, from scratch as the book)")
    p.add_argument("--depth", type=int, default=56, help="ResNet-v2 depth, 9n + 2 (fcn_resnet56v2 only)")
    p.add_argument("--n-layers", type=int, default=4, help="feature pyramid layers (fcn_resnet56v2 only)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="training data loader worker processes per process (default: the cores, shared among "
                        "torchrun's processes on this machine, at most 8); validation uses at most 2")
    p.add_argument("--run-name", default=None, help="output name (default: built from the model)")
    p.add_argument("--output-dir", default="weights", help="checkpoints and logs go to <output-dir>/<run-name>")
    p.add_argument("--figures-dir", default="figures", help="figures go to <figures-dir>/<run-name>")
    p.add_argument("--resume", action="store_true", help="continue from <output-dir>/<run-name>/last.pt if it exists")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N training images (smoke runs: no start-up time estimate on the CPU)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the training annotations held out")
    p.add_argument("--augment", choices=AUGMENTATIONS, default="full",
                   help="training augmentation: full (flip, scale-crop, colour jitter), flip (only), none (resize)")
    p.add_argument("--no-augment", dest="augment", action="store_const", const="none",
                   help="same as --augment none: the book's plain pipeline, resize only")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast where supported, fp16 with loss scaling on older GPUs (--no-amp: float32)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format (faster convolutions on CPU and GPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step's forward pass and loss (backward included), once per "
                        "input size; the compile time is printed")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of --compile (aot_eager: traced but not code-generated, to check)")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode of --compile: reduce-overhead replays the step as CUDA graphs")
    p.add_argument("--compile-cache", default=None, metavar="FILE",
                   help="with --compile: load torch.compile's portable cache from FILE when it exists and write it "
                        "back after each compile, so another machine skips most of the compile (torch >= 2.7)")
    p.add_argument("--data-on-device", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the decoded training and validation images on the device and augment them there "
                        "(the same augmentation as the loader's, from the same seeds); default: on for CUDA when "
                        "they fit in a quarter of its free memory, off elsewhere")
    p.add_argument("--save-every", type=int, default=1, metavar="N",
                   help="write last.pt every N epochs (and at the last; best.pt whenever validation improves)")
    p.add_argument("--save-in-background", action=argparse.BooleanOptionalAction, default=None,
                   help="write checkpoints and curves from a background thread while the next epoch trains "
                        "(default: on for CUDA; off on the CPU, where the training's threads use every core)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log to TensorBoard under <run dir>/tb/ (needs the tensorboard package): the loss and "
                        "rate as the loop syncs, each epoch's validation metrics, speed and predictions; off by "
                        "default (metrics.jsonl is the run's record either way)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes when distributed")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the data order and the augmentation")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of which training images are held out for validation (default 0 for every --seed, "
                        "so runs of several seeds validate on the same images)")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (bitwise-reproducible runs)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--ema", type=ema_decay, default=0.0, metavar="DECAY",
                   help="validate, keep and test an exponential moving average of the weights with this decay per "
                        "step, e.g. 0.999 (0: off, the book)")
    p.add_argument("--tta", default="none", choices=TTA_MODES,
                   help="test-time augmentation of the validation and the final test evaluation: flip averages the "
                        "logits of each image and its mirror, scales those of the image at 1, 1.25 and 1.5 times "
                        "the input size, flip+scales both (the book: none)")
    p.add_argument("--val-tta", default=None, choices=TTA_MODES,
                   help="test-time augmentation of the validation only (default: --tta's); a cheaper one keeps "
                        "the epochs short")
    p.add_argument("--loss", default="ce", choices=LOSSES,
                   help="training loss: ce (the book's cross-entropy), dice (soft Dice), lovasz (Lovász-Softmax per "
                        "image), ce+dice or ce+lovasz (cross-entropy plus --loss-weight times the other)")
    p.add_argument("--loss-weight", type=float, default=1.0, help="weight of the Dice or Lovász term of ce+dice and "
                                                                   "ce+lovasz")
    p.add_argument("--class-weights", type=class_weights, default="none", metavar="none|auto|W0,W1,...",
                   help="class weights of the cross-entropy: none (the book), auto (median frequency balancing: "
                        "w_c = median(f) / f_c, where f_c is the share of the training split's pixels in class c) "
                        "or one number per class, comma-separated")
    p.add_argument("--progressive", type=progressive_step, nargs="*", default=[], metavar="HxW:UNTIL",
                   help="progressive resizing: train at HxW until that fraction of the epochs, then at the next "
                        "step's size, and at --height x --width after the last step (e.g. 64x96:0.5); default, "
                        "or the flag with no step (to switch a recipe's off): --height x --width throughout")
    p.add_argument("--flips", choices=("random", "alternate"), default="random",
                   help="horizontal flips of --augment flip and full: random (each image, each epoch), or "
                        "alternate (each image mirrored every other epoch, from a seeded first toss)")
    p.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction, default=False,
                   help="start each bottleneck unit as the identity (its last conv kernel zero); off (the default, "
                        "or --no-zero-init-residual to switch a recipe's off): the book's init")
    p.add_argument("--no-test", dest="test", action="store_false", help="skip the final test-split evaluation")
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


def _background(args, device):
    """Whether checkpoints and curves are written from a background thread (--save-in-background)."""
    return device.type == "cuda" if args.save_in_background is None else args.save_in_background


def main(args):
    """Train, validate every epoch, keep last.pt and best.pt, and score best.pt on the test split."""
    started = time.perf_counter()  # the CPU estimate counts the start-up in the run's time
    check_args(args)
    keep_freed_memory()
    args = resolve_args(args)
    info, device = init_distributed(args.device)
    try:
        return _train(args, info, device, started)
    finally:
        if info.distributed:
            dist.destroy_process_group()


def _train(args, info, device, started):
    seed_everything(args.seed, args.deterministic)
    run_dir, fig_dir = Path(args.output_dir) / args.run_name, Path(args.figures_dir) / args.run_name
    last_path, best_path, metrics_path = run_dir / "last.pt", run_dir / "best.pt", run_dir / "metrics.jsonl"
    if last_path.exists() and not args.resume:
        raise TrainingError(f"{last_path} exists: pass --resume to continue that run, or choose another --run-name")
    # loaded onto the CPU: load_state_dict copies weights and optimizer state to the model's device, and the RNG
    # states must be CPU tensors whatever device the run trains on
    ckpt = load_checkpoint(last_path) if args.resume and last_path.exists() else None
    wanted = (args.model, model_options(args.model, args))
    if ckpt is not None and checkpoint_model(ckpt["config"]) != wanted:
        raise TrainingError(f"{last_path} holds {checkpoint_model(ckpt['config'])}, not this run's {wanted}: "
                            f"resume with the same model flags")
    if ckpt is not None:
        check_same_padding(ckpt["config"], last_path)
        check_resume(args, ckpt, last_path)
    dtype = amp_dtype(device, args.amp)
    # each node's first process readies its own copy (nodes need not share a filesystem); the others wait
    data_path = ensure_data(args.data_path) if info.local_rank == 0 else Path(args.data_path)
    barrier(device)
    train_set, class_names = make_dataset(data_path, "train", args.height, args.width, args.augment,
                                          args.val_fraction, args.split_seed, args.limit, workers=args.workers,
                                          random_flip=args.flips == "random")
    if ckpt is not None and list(ckpt["config"]["class_names"]) != list(class_names):
        raise UsageError(f"--data-path {args.data_path}: its classes {class_names} are not those of {last_path} "
                         f"({ckpt['config']['class_names']})")
    val_set, _ = make_dataset(data_path, "val", args.height, args.width, False, args.val_fraction, args.split_seed,
                              workers=args.workers)
    train_loader, val_loader = build_loaders(args, train_set, val_set, device, info)
    if len(train_loader) == 0:
        raise UsageError(f"--batch-size {args.batch_size}: {len(train_set)} training images give no full batch of "
                         f"{args.batch_size} per process")

    weights = resolve_class_weights(args.class_weights, train_set, class_names)
    model = build_model(args.model, len(class_names), **model_options(args.model, args))
    if args.zero_init_residual and zero_init_residual_(model) == 0:
        raise UsageError(f"--zero-init-residual: --model {args.model} has no ResNet-v2 bottleneck units")
    if args.pretrained_backbone and ckpt is None:
        state = read_backbone_weights(args.model, args.pretrained_backbone)
        load_backbone_(model, args.model, state, args.pretrained_backbone)
    if ckpt is not None:  # before anything is written: weights that do not fit leave the run's files as they were
        load_resumed_weights(model, ckpt["model"], last_path)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if info.is_main:  # every check has passed: only now is anything written
        print(json.dumps(vars(args), indent=2))
        on_device = isinstance(train_loader, DeviceTrainLoader)
        print(f"device: {device}, autocast: {dtype}, processes: {info.world_size}, data: "
              + ("on the device" if on_device else f"{args.workers} loader workers"))
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json({**vars(args), "device": str(device), "autocast": str(dtype), "world_size": info.world_size,
                    "data_on_device": on_device}, run_dir / "config.json")
    tb = None
    optimizer = build_optimizer(model, args.lr, args.l2, args.adam_eps)
    scaler = make_grad_scaler(device, dtype)
    criterion = build_criterion(args.loss, None if weights is None else weights.to(device), args.loss_weight)
    start_epoch, start_step, best = 0, 0, -1.0
    loss_state = torch.zeros(2, dtype=torch.float64, device=device)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        restore_grad_scaler(scaler, ckpt["scaler"])
        start_epoch, start_step, best = ckpt["epoch"], ckpt["step"], ckpt["best_miou"]
        loss_state = ckpt["loss_state"].to(device)
        set_rng_state(ckpt["rng"])
        if info.is_main:
            print(f"resumed {last_path}: epoch {start_epoch + 1}, step {start_step}, best val mIoU {best:.4f}")
    if info.is_main:  # a run killed before its first last.pt starts again: its metrics lines go too
        trim_metrics(metrics_path, start_epoch)
    ema = ModelEMA(model, args.ema) if args.ema else None  # the weights validated, kept as best.pt and tested
    if ema is not None and ckpt is not None and "ema" in ckpt:
        ema.load_state_dict(ckpt["ema"])
    if args.sync_bn and info.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_model = model
    if info.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = None
    if args.compile:
        if args.compile_cache and load_compile_cache(args.compile_cache) and info.is_main:
            print(f"loaded the compile cache {args.compile_cache}")
        loss_fn = LossFunction(train_model, criterion, dtype, args.compile_backend, args.compile_mode)
    estimated = None  # (height, width): the CPU estimate's seconds of an epoch at that size
    if device.type == "cpu" and info.is_main and start_epoch < args.epochs and args.limit is None:
        n_test = len(load_annotations(data_path, "test")) if args.test else 0
        minutes, estimated = estimate_cpu_run(model, args, dtype, len(train_set), len(val_set),
                                              Criterion(args.loss, weights, args.loss_weight), n_test,
                                              time.perf_counter() - started, len(class_names), start_epoch)
        sizes = " then ".join(f"{h}x{w}" for h, w in sizes_from(args.progressive, start_epoch, args.epochs,
                                                                (args.height, args.width)))
        what = (f"rest of the run (the last {args.epochs - start_epoch} of {args.epochs} epochs" if start_epoch
                else f"whole run ({args.epochs} epochs")
        print(f"no GPU: training on the CPU. Estimated time of the {what} of {len(train_set)} images at {sizes}, "
              f"validation{', the test split' if n_test else ''}): "
              f"{minutes:.0f} min. The CPU recipe (README.md gives its time by CPU): {CPU_COMMAND}")

    steps_per_epoch = len(train_loader)  # before any skip of a resumed epoch shortens it
    measured = {}  # (height, width): seconds of the latest epoch at that size
    if args.tensorboard and info.is_main:
        # from the step after the checkpoint on, whatever an interrupted run logged goes (TensorBoard's purge)
        tb = TensorBoardLog(run_dir / "tb", purge_step=start_epoch * steps_per_epoch + start_step + 1)
    # the log closes after the writer has run its last jobs (the last epoch's figure goes into the log)
    with StopRequest() as stop, (tb or nullcontext()), BackgroundWriter(threaded=_background(args, device)) as writer:
        for epoch in range(start_epoch, args.epochs):
            def lr_fn(step, epoch=epoch):
                return learning_rate(args.lr_schedule, epoch * steps_per_epoch + step, steps_per_epoch, args.epochs,
                                     args.lr, args.warmup_epochs)

            lr = lr_fn(0)
            size = epoch_size(args.progressive, epoch, args.epochs, (args.height, args.width))
            train_loader.sampler.set_epoch(epoch)
            train_loader.sampler.size = size
            train_loader.sampler.alternate_flips = args.flips == "alternate"
            train_loader.sampler.skip = start_step * args.batch_size if epoch == start_epoch else 0
            t0 = time.perf_counter()
            loss_state, step, stopped = train_one_epoch(
                train_model, criterion, optimizer, scaler, train_loader, device, epoch, args, dtype, stop,
                start_step if epoch == start_epoch else 0, loss_state, info.is_main, info.world_size, lr_fn,
                None if ema is None else lambda: ema.update(model), loss_fn,
                tb and (lambda step, loss, lr, epoch=epoch: tb.step(epoch * steps_per_epoch + step, loss, lr)))
            if stopped:
                if info.is_main:
                    writer.wait()  # an older last.pt still being written must not land after this one
                    save_checkpoint(checkpoint_state(model, optimizer, scaler, args, class_names, epoch, step, best,
                                                     loss_state, ema), last_path)
                    print(f"saved {last_path} at epoch {epoch + 1} step {step}; continue with --resume")
                return None
            scored = model if ema is None else ema.module
            broadcast_buffers(scored)
            val_acc, _ = evaluate_model(scored, val_loader, device, len(class_names), dtype, args.channels_last,
                                        tta=args.val_tta or args.tta)
            val_acc.all_reduce()
            val = val_acc.compute(class_names)
            train_loss = (loss_state[0] / loss_state[1]).item()
            loss_state.zero_()
            improved = val["miou_per_image"] > best
            best = max(best, val["miou_per_image"])
            if info.is_main:
                record = {"epoch": epoch + 1, "train_loss": train_loss, "lr": lr, "size": list(size),
                          "seconds": round(time.perf_counter() - t0, 2), "time": round(time.time(), 3),
                          "train_images": steps_per_epoch * args.batch_size * info.world_size,
                          "val": {k: v for k, v in val.items() if k != "per_class"},
                          "val_iou_per_class": [r["iou"] for r in val["per_class"]]}
                append_jsonl(metrics_path, record)
                due = (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs
                # the snapshot is taken here, on this thread; the disk and the figure are the writer's
                state = checkpoint_state(model, optimizer, scaler, args, class_names, epoch + 1, 0, best, loss_state,
                                         ema) if improved or due else None
                state = host_copy(state) if writer.threaded and state else state
                jobs = [save_job(state, best_path if improved else None, last_path if due else None),
                        lambda: plot_curves(metrics_path, fig_dir / "curves.png")]
                if tb is not None:  # the scalars now; the figure of this epoch's predictions with the files
                    jobs.append(tb.epoch((epoch + 1) * steps_per_epoch, record, class_names, scored, val_set,
                                         device, dtype, args.channels_last))
                writer.submit(*jobs)
                if loss_fn is not None and args.compile_cache and loss_fn.take_new_graphs():
                    save_compile_cache(args.compile_cache)
                if not (epoch == start_epoch and start_step):  # a resumed partial epoch is no epoch's time
                    measured[size] = record["seconds"]
                left = seconds_left(measured, args.progressive, epoch + 1, args.epochs, (args.height, args.width),
                                    estimated)
                print(f"epoch {epoch + 1}: train loss {train_loss:.4f}, val mIoU per image {val['miou_per_image']:.4f}"
                      f", val mIoU {val['miou']:.4f}{'  (best)' if improved else ''}, {record['seconds']:.0f} s"
                      + (f", about {left / 60:.1f} min left" if left else ""))

    check_weights_agree(model, info.is_main)
    barrier(device)
    if info.is_main and args.test and best_path.exists():
        metrics = evaluate_checkpoint(best_path, data_path, "test", args.batch_size, args.workers, str(device),
                                      args.amp, args.channels_last, run_dir / "test_metrics.json",
                                      figures_dir=fig_dir, tta=args.tta)
        return metrics
    return None


if __name__ == "__main__":
    run_cli(main, get_args_parser())
