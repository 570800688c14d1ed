"""The flags of ``train``: ``pretrain`` takes them all with its own defaults, ``lr-find`` those
that shape a step. Grouped as ``--help`` lists them; the recipe's flags last."""

from __future__ import annotations

import argparse

from gluon_ft.cli.common import positive_float, positive_int


def add_train_arguments(p: argparse.ArgumentParser, defaults=None, run_flags=True) -> None:
    """The flags of ``train``; ``pretrain`` shares them with its own defaults and without
    the two ``run_flags`` whose meaning differs there (``--pretrained``, ``--out``)."""
    from gluon_ft.train import TrainConfig

    d = defaults or TrainConfig()
    _add_data_flags(p, d, run_flags)
    _add_optimizer_flags(p, d)
    _add_crop_flags(p, d)
    _add_freeze_flags(p, d)
    _add_device_flags(p, d)
    _add_selection_flags(p, d)
    add_recipe_arguments(p, d)
    p.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of the split, the new layers' initialization, the sample order, the "
        "augmentations and Dropout (default %(default)s)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse a dataset with unreadable images (default: skip them, with a warning)",
    )
    if run_flags:
        p.add_argument(
            "--out", default=d.out, help="run directory (default runs/<data>-<model>-<time>)"
        )
        p.add_argument(
            "--resume",
            action="store_true",
            help="continue the run in --out from its last complete checkpoint",
        )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write each epoch's numbers as TensorBoard event files under RUN/tensorboard/",
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no epoch lines (progress bars are drawn only on a terminal)",
    )


def _add_data_flags(p: argparse.ArgumentParser, d, run_flags: bool = True) -> None:
    """The data, the model and its weights."""
    p.add_argument(
        "--data",
        default=d.data,
        help="hotdog, DIR/<class>/* (split for you), DIR with train/<class>/* and test/ "
        "(and optionally val/), or a pack PREFIX",
    )
    p.add_argument(
        "--val-split",
        type=float,
        default=d.val_split,
        metavar="F",
        help="fraction of each class held out for validation, from the train part "
        "(default: 0.1 for DIR/<class>/*, 0 for train/ + test/, the book's)",
    )
    p.add_argument(
        "--test-split",
        type=float,
        default=d.test_split,
        metavar="F",
        help="fraction of each class held out for the test, for DIR/<class>/* (default 0.1)",
    )
    _add_label_flags(p, d)
    p.add_argument("--model", default=d.model, help="model zoo name (default %(default)s)")
    if run_flags:
        p.add_argument(
            "--pretrained",
            default=d.pretrained,
            help="imagenet | none | FILE.params (default %(default)s)",
        )


def _add_label_flags(p: argparse.ArgumentParser, d) -> None:
    """A labels CSV instead of class folders, and the multi-label settings."""
    p.add_argument(
        "--labels",
        default=d.labels,
        metavar="FILE.csv",
        help="a CSV with a header row: image (a path under --data), labels, and optionally "
        "split (train, val or test); --data is then the image folder",
    )
    p.add_argument(
        "--label-delim",
        default=d.label_delim,
        metavar="D",
        help="what separates the labels of one row of --labels (default: a space)",
    )
    p.add_argument(
        "--multi-label",
        action="store_true",
        help="each image has a set of labels: sigmoid outputs, binary cross-entropy, the "
        "best epoch by val mAP (chosen for you when a row of --labels has two or more)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=d.threshold,
        metavar="T",
        help="multi-label: a class is predicted at this probability or above (default 0.5)",
    )
    p.add_argument(
        "--thresholds",
        choices=("auto",),
        default=d.thresholds,
        help="multi-label: auto chooses one threshold per class, the best F1 on the val part "
        "(thresholds.json); replaces --threshold",
    )


def _add_optimizer_flags(p: argparse.ArgumentParser, d) -> None:
    """Epochs, batch, the optimizer and the schedule."""
    from gluon_ft.train.schedule import SCHEDULES

    p.add_argument(
        "--epochs",
        type=positive_int,
        default=d.epochs,
        help="epochs to train, --head-epochs included (default %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=d.batch_size,
        help="samples per step over all devices and workers (a dist run splits it) "
        "(default %(default)s)",
    )
    p.add_argument(
        "--lr",
        type=positive_float,
        default=d.lr,
        help="SGD rate per batch: trainer.step(batch_size) divides the summed gradient, as the "
        "book's MXNet recipe (default %(default)s). d2l's text now writes it per sample, "
        "lr / batch size with step(1): its 7.8125e-5 and 7.8125e-4 are --lr 0.01 and 0.1 here",
    )
    p.add_argument(
        "--head-lr-mult",
        type=positive_float,
        default=None,  # None: not given (see TrainConfig.warnings)
        help=f"lr_mult of the new output layer (default {d.head_lr_mult:g}); from scratch "
        "(--pretrained none, pretrain) there is no new head and it has no effect",
    )
    p.add_argument(
        "--wd",
        type=float,
        default=d.wd,
        help=f"weight decay (default {d.wd:g}): SGD's L2 term; decoupled under --optimizer adamw",
    )
    p.add_argument(
        "--momentum",
        type=float,
        default=d.momentum,
        help="SGD momentum, in [0, 1); no effect under --optimizer adamw (default %(default)s)",
    )
    p.add_argument(
        "--lr-schedule",
        choices=SCHEDULES,
        default=d.lr_schedule,
        help="constant, or cosine: from --lr down to 0 over the run; or onecycle: PyTorch's "
        "OneCycleLR (fastai's fit_one_cycle), up from --lr/25 over a quarter of the steps, "
        "then down, with AdamW's beta1 cycled 0.95-0.85-0.95; the head epochs get a cycle of "
        "their own; its warm-up replaces --warmup-epochs (default %(default)s)",
    )
    p.add_argument(
        "--warmup-epochs",
        type=float,
        default=d.warmup_epochs,
        metavar="E",
        help="raise the lr linearly to --lr over the first E epochs (default %(default)s)",
    )


def _add_crop_flags(p: argparse.ArgumentParser, d) -> None:
    """The size of the crops, in training and test."""
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=d.image_size,
        help="training crop and test size in px (default: the model's, see `gluon-ft models`)",
    )
    p.add_argument(
        "--crop-scale",
        type=positive_float,
        default=d.crop_scale,
        metavar="S",
        help="random train crops cover S to all of the image's area (default %(default)s, "
        "the book's; small images may need more, e.g. 0.5)",
    )
    p.add_argument(
        "--eval-resize",
        type=positive_float,
        default=d.eval_resize,
        metavar="R",
        help="evaluation (val, test, predict) resizes to R x --image-size, then crops the "
        "centre (default 1.143: 256/224, the book's); 1: the whole image, uncropped",
    )


def _add_freeze_flags(p: argparse.ArgumentParser, d) -> None:
    """What trains, and how fast each part learns."""
    from gluon_ft.model.freeze import BN_MODES

    p.add_argument(
        "--freeze",
        default=d.freeze,
        help="none | a part (features, output, stem, stage1.., tail: `gluon-ft models NAME "
        "--parts`) | a regex on parameter names",
    )
    p.add_argument(
        "--bn",
        choices=BN_MODES,
        default=d.bn,
        help="BatchNorm in frozen parts: freeze (use running statistics) or train (also in "
        "the --head-epochs, which then run on the images, not cached features: fastai's "
        "train_bn); inference: every BatchNorm uses its running statistics, in the parts that "
        "train too (Keras's advice for fine-tuning; gamma and beta still learn) (default "
        "%(default)s)",
    )
    p.add_argument(
        "--layer-lr-decay",
        type=positive_float,
        default=d.layer_lr_decay,
        metavar="D",
        help="lr_mult D**k for the stage k from the top (the head is 0)",
    )
    p.add_argument(
        "--lr-spread",
        type=positive_float,
        default=d.lr_spread,
        metavar="S",
        help="fastai's three rate groups, slice(lr/S, lr): lr_mult 1/S for the stem, "
        "1/sqrt(S) for every stage, 1 for the tail (the head keeps --head-lr-mult); not with "
        "--layer-lr-decay",
    )
    p.add_argument(
        "--unfreeze-at",
        default=d.unfreeze_at,
        metavar="EPOCH:PART,...",
        help='gradual unfreezing from a frozen network, e.g. "0:output,2:stage4,4:all"',
    )
    p.add_argument(
        "--accumulate",
        type=positive_int,
        default=d.accumulate,
        metavar="N",
        help="sum gradients over N micro-batches of each batch, then step once",
    )


def _add_device_flags(p: argparse.ArgumentParser, d) -> None:
    """Devices, workers, precision and the feature cache."""
    p.add_argument("--ctx", default=d.ctx, help="auto | cpu | cpu:N | gpu:0,1")
    p.add_argument(
        "--kvstore",
        default=d.kvstore,
        help="kvstore type (default: fits --ctx); dist_sync under `gluon-ft launch`",
    )
    p.add_argument(
        "--sync-bn-stats",
        action=argparse.BooleanOptionalAction,
        default=d.sync_bn_stats,
        help="average the BatchNorm running statistics over devices and workers at the end of "
        "each epoch, before the test pass and the save (default: on with several devices or "
        "workers)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help="data loader processes; 0 loads in the training process (default %(default)s)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16", "auto"),
        default=d.dtype,
        help="float32; bfloat16 (CPU with avx512_bf16/amx) or float16 (GPU), through MXNet AMP; "
        "auto: bfloat16 where a short probe measures it faster here, float16 on GPUs",
    )
    p.add_argument(
        "--cache-features",
        action="store_true",
        help="with a frozen backbone (--freeze features), compute its features once and train "
        "the head on them; cached under $MXNET_HOME/features",
    )
    p.add_argument(
        "--cache-views",
        type=positive_int,
        default=d.cache_views,
        metavar="K",
        help="random train augmentations cached per image; epoch e uses view e %% K (default 1)",
    )


def _add_selection_flags(p: argparse.ArgumentParser, d) -> None:
    """Which epoch is kept, and how the classes are weighed."""
    p.add_argument(
        "--monitor",
        choices=("val_acc", "val_loss", "val_map"),
        default=d.monitor,
        help="what picks the best epoch, whose weights become model.params (default "
        "%(default)s; val_map, the mean average precision, for a multi-label run; needs a "
        "val part, else the last epoch is kept)",
    )
    p.add_argument(
        "--early-stop",
        type=positive_int,
        default=d.early_stop,
        metavar="N",
        help="stop after N epochs without improvement of --monitor (needs a val part)",
    )
    p.add_argument(
        "--keep-checkpoints",
        type=positive_int,
        default=d.keep_checkpoints,
        metavar="K",
        help="keep the checkpoints of the last K epochs and of the best (default %(default)s)",
    )
    p.add_argument(
        "--class-weights",
        choices=("none", "auto"),
        default=d.class_weights,
        help="auto: weight each sample's loss by the inverse frequency of its class in the "
        "train part (default %(default)s)",
    )
    p.add_argument(
        "--sampler",
        choices=("uniform", "balanced"),
        default=d.sampler,
        help="balanced: draw each epoch's samples so that every class comes equally often "
        "(with replacement, from --seed) (default %(default)s)",
    )


def add_recipe_arguments(p: argparse.ArgumentParser, d) -> None:
    """The flags of "Getting the most out of a small dataset" (README); each is off by
    default, the book's recipe."""
    from gluon_ft.train.config import (
        MULTI_LABEL_PRESETS,
        OPTIMIZERS,
        RECIPES,
        describe_preset,
        flags_of,
    )

    g = p.add_argument_group("recipe", "tricks for small datasets; all off in the book's recipe")
    g.add_argument(
        "--recipe",
        choices=RECIPES,
        default=d.recipe,
        help="book (default): the book's recipe; best: a preset, written out in config.json, "
        f"which flags given explicitly override: {describe_preset('best')}; on a "
        f"multi-label run: {flags_of(MULTI_LABEL_PRESETS['best'])}",
    )
    g.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=d.optimizer,
        help="sgd (default, the book's) or adamw (betas 0.9/0.999, eps 1e-8): --wd is then "
        "decoupled, each step takes lr * wd * w off, as PyTorch's AdamW(weight_decay=wd); "
        "try --lr 0.001 --wd 0.01",
    )
    g.add_argument(
        "--label-smoothing",
        type=float,
        default=d.label_smoothing,
        metavar="F",
        help="train on targets of 1 - F + F/K for the class and F/K for each other of the K "
        "classes (default 0)",
    )
    g.add_argument(
        "--mixup",
        type=float,
        default=d.mixup,
        metavar="ALPHA",
        help="mix pairs of images and their targets, weights from Beta(ALPHA, ALPHA) (0: off)",
    )
    g.add_argument(
        "--cutmix",
        type=float,
        default=d.cutmix,
        metavar="ALPHA",
        help="paste a box of another image, targets by area, from Beta(ALPHA, ALPHA) (0: off)",
    )
    g.add_argument(
        "--mixup-off-epoch",
        dest="mix_off_epoch",
        type=positive_int,
        default=d.mix_off_epoch,
        metavar="E",
        help="no mixup or CutMix from epoch E (1-based) on (default: mix in every epoch)",
    )
    _add_evaluation_flags(g, d)


def _add_evaluation_flags(g, d) -> None:
    """The recipe flags of what is evaluated and kept: EMA, TTA, and the head epochs."""
    from gluon_ft.train.config import EMA_SAVES

    g.add_argument(
        "--ema",
        type=float,
        default=d.ema,
        metavar="DECAY",
        help="keep an exponential moving average (EMA) of the weights, e.g. 0.999: after each "
        "step ema = d*ema + (1-d)*w with d = min(DECAY, (1+t)/(10+t)), t the updates so far, "
        "so that short runs move it too; it is evaluated each epoch too, and saved as the "
        "model when better on validation (see --ema-save); 0: off (default)",
    )
    g.add_argument(
        "--ema-save",
        choices=EMA_SAVES,
        default=d.ema_save,
        help="if-better (default): model.params is the last epoch's EMA when it beats the "
        "kept weights by --monitor on validation (without a val part: the weights); "
        "always: the EMA",
    )
    g.add_argument(
        "--tta",
        type=positive_int,
        default=d.tta,
        metavar="N",
        help="test-time augmentation in each epoch's evaluation and the report: average the "
        "logits of N views (1-12: plain, its flip, then crops of a 1.14x larger resize and "
        "their flips; not with --cache-features) (default 1: the plain center crop)",
    )
    g.add_argument(
        "--head-epochs",
        type=int,
        default=d.head_epochs,
        metavar="E",
        help="train the new head alone for the first E of --epochs, on cached features, "
        "then the whole network (default 0)",
    )
    g.add_argument(
        "--adapt-bn",
        action="store_true",
        default=d.adapt_bn,
        help="AdaBN: before training, re-estimate every BatchNorm's running statistics on the "
        "train part (one forward pass of its plain view, no weight changes), so that the "
        "body normalizes with the target's statistics rather than the source's",
    )
    g.add_argument(
        "--precise-bn",
        action="store_true",
        default=d.precise_bn,
        help="the same after the last epoch's steps, before its evaluation and save: the "
        "running statistics become the exact mean over the train part's plain view, not "
        "an exponential average of augmented batches (not with --cache-features)",
    )
