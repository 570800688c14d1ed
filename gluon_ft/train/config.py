"""The settings of a training run: :class:`TrainConfig` and its validation.

``config.json`` in a run directory is this, plus what the run resolved (contexts, sizes).
The defaults are the book's MXNet recipe: SGD with lr 0.01, wd 0.001, batch 128, 5 epochs,
the new head learning 10x faster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from gluon_ft.data.balance import balanced_probabilities
from gluon_ft.data.transforms import BOOK_RESIZE, TrainTransform
from gluon_ft.data.tta import check_views, eval_transform
from gluon_ft.errors import UsageError
from gluon_ft.model import zoo
from gluon_ft.model.freeze import FreezePlan
from gluon_ft.train.schedule import SCHEDULES
from gluon_ft.train.selection import MONITORS

# An SGD --lr below this, with a batch of PER_SAMPLE_BATCH or more, is most likely a per-sample
# rate: d2l's MXNet text divides its rates by the batch (7.8125e-5 = 0.01 / 128) since its
# train_batch_ch13 sums the loss and calls step(1); gluon-ft divides in trainer.step(batch).
PER_SAMPLE_LR = 1e-3
PER_SAMPLE_BATCH = 32

RECIPES = ("book", "best")
# A value of --lr in a preset: the rate comes from a short LR range test on the training split
# (gluon_ft.train.lr_find), run by train() before the first epoch.
FIND_LR = "find"
# What --recipe sets, for each flag not given explicitly. "best" was chosen by the ablations
# in docs/recipes.md ("The best recipe", "Against a fastai-style peer"): from
# BEST_FEW_SHOT_BELOW images a class on (food10-64, pizza64), fastai's fine_tune with
# BatchNorm trained on the target; below it (food10-64-20shot), BEST_FEW_SHOT, which keeps
# the source's BatchNorm statistics and measures its rate.
RECIPE_PRESETS: dict[str, dict] = {
    "book": {},
    "best": {
        "optimizer": "adamw",
        "lr": 1e-3,
        "head_lr_mult": 1.0,
        "lr_spread": 50.0,
        "wd": 0.01,
        "lr_schedule": "onecycle",
        "crop_scale": 0.25,
        "bn": "train",
        "head_epochs": 1,
        "label_smoothing": 0.1,
        "tta": 2,
    },
}
# What --recipe sets instead on a multi-label run (the data decides, after it is read:
# gluon_ft.train.run.check_multi_label), for each flag not given explicitly. Chosen on the val
# part of food4-multilabel64 (docs/datasets.md): an image holds several labelled objects, often
# off-centre, so the train crop keeps the whole image (a random crop cuts one out, and its
# label is then wrong) and so does the evaluation (the book's centre crop cuts the edges);
# BCE label smoothing and the flipped TTA view each lowered val mAP there.
MULTI_LABEL_PRESETS: dict[str, dict] = {
    "best": {"crop_scale": 1.0, "eval_resize": 1.0, "label_smoothing": 0.0, "tta": 1},
}
BEST_FEW_SHOT = {
    "optimizer": "adamw",
    "lr": FIND_LR,
    "wd": 0.01,
    "lr_schedule": "cosine",
    "warmup_epochs": 0.5,
    "crop_scale": 0.25,
    "layer_lr_decay": 0.5,
    "bn": "inference",
    "head_epochs": 1,
    "label_smoothing": 0.1,
    "tta": 2,
}
BEST_FEW_SHOT_BELOW = 50  # images a class in the train part


def task_images_per_class(data: str, labels: str | None = None, delim: str = " "):
    """Images a class in the train part of ``--data`` (its class folders), or of ``--labels``
    (its train rows) when given; None when it cannot be told."""
    from gluon_ft.data.folders import images_per_class
    from gluon_ft.data.labels import labelled_images_per_class

    return labelled_images_per_class(labels, delim) if labels else images_per_class(data)


def recipe_preset(recipe: str, images_per_class: float | None = None) -> tuple[dict, str | None]:
    """``(preset, shape)``: what ``--recipe`` sets for a train part of ``images_per_class``
    images a class (None: unknown, the many-image preset), and the shape it chose by, for
    ``config.json`` (None for the book's)."""
    if recipe != "best":
        return RECIPE_PRESETS[recipe], None
    if images_per_class is not None and images_per_class < BEST_FEW_SHOT_BELOW:
        return (
            BEST_FEW_SHOT,
            f"few-shot: {images_per_class:g} < {BEST_FEW_SHOT_BELOW} images a class",
        )
    known = "unknown" if images_per_class is None else f"{images_per_class:g}"
    shape = f"many: {known} images a class (>= {BEST_FEW_SHOT_BELOW} or unknown)"
    return RECIPE_PRESETS[recipe], shape


OPTIMIZERS = ("sgd", "adamw")
EMA_SAVES = ("if-better", "always")


def replaced_by(given, lr_schedule: str) -> set[str]:
    """The preset's settings that the ``given`` ones replace: rate groups and a schedule's
    warm-up come as one choice, so a given ``--lr-spread`` or ``--layer-lr-decay`` replaces
    the preset's other one, and a given onecycle schedule (its own warm-up) the preset's
    ``--warmup-epochs``."""
    replaced = set()
    if "lr_spread" in given:
        replaced.add("layer_lr_decay")
    if "layer_lr_decay" in given:
        replaced.add("lr_spread")
    if "lr_schedule" in given and lr_schedule == "onecycle":
        replaced.add("warmup_epochs")
    return replaced


def flags_of(settings: dict) -> str:
    """Settings as the command-line flags that give them: ``--lr-schedule cosine``."""
    words = []
    for name, value in settings.items():
        flag = "--" + {"mix_off_epoch": "mixup-off-epoch"}.get(name, name.replace("_", "-"))
        if value is True:
            words.append(flag)  # a switch: --precise-bn
        else:
            words.append(f"{flag} {'(lr-find)' if value == FIND_LR else value}")
    return " ".join(words)


def describe_preset(recipe: str) -> str:
    """``--help``'s account of what ``recipe`` sets."""
    if recipe == "best":
        return (
            f"{flags_of(RECIPE_PRESETS[recipe])}; with fewer than {BEST_FEW_SHOT_BELOW} train "
            f"images a class: {flags_of(BEST_FEW_SHOT)}"
        )
    return flags_of(RECIPE_PRESETS[recipe]) or "nothing"


@dataclass
class TrainConfig:
    """Every setting of a training run; ``config.json`` is this, plus what was resolved."""

    data: str = "hotdog"
    labels: str | None = None  # a labels CSV; --data is then the folder its paths are under
    label_delim: str = " "  # what separates the labels of one row of --labels
    multi_label: bool = False  # sigmoid outputs, a set of labels per image; set by the data too
    threshold: float = 0.5  # multi-label: a class is predicted at this probability or above
    thresholds: str | None = None  # auto: one threshold per class, chosen on the val part
    val_split: float | None = None  # None: 0.1 for a folder of classes, 0 for train/ + test/
    test_split: float | None = None  # None: 0.1 for a folder of classes (else test/ is used)
    model: str = "resnet18_v2"
    pretrained: str = "imagenet"
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.01
    head_lr_mult: float = 10.0
    wd: float = 0.001
    momentum: float = 0.0
    lr_schedule: str = "constant"  # constant | cosine (down to 0 at the end of the last epoch)
    warmup_epochs: float = 0.0  # linear warmup to --lr over the first epochs
    image_size: int | None = None  # None: the model's own input size (299 for inceptionv3)
    crop_scale: float = 0.08  # smallest area fraction of the random train crop (the book's)
    eval_resize: float = BOOK_RESIZE  # evaluation: resize to this x image_size, center crop
    ctx: str = "auto"
    kvstore: str | None = None
    sync_bn_stats: bool | None = None  # average BatchNorm running statistics; None: if >1 copy
    dtype: str = "float32"
    workers: int = 0
    seed: int = 0
    out: str | None = None
    freeze: str = "none"  # none | a part (features, stage1..) | a regex on parameter names
    bn: str = "freeze"  # BatchNorm of frozen parts: freeze (running statistics) | train
    layer_lr_decay: float | None = None  # stage k from the top learns D**k as fast
    lr_spread: float | None = None  # fastai's slice(lr/S, lr): stem 1/S, stages 1/sqrt(S)
    unfreeze_at: str | None = None  # gradual unfreezing, "0:output,2:stage4,4:all"
    accumulate: int = 1  # micro-batches per step (gradient accumulation, grad_req 'add')
    progress: bool = True  # the epoch lines (and on a terminal, progress bars)
    tensorboard: bool = False  # event files under RUN/tensorboard/ (tensorboardX)
    log_every: int = 10  # steps between host reads of the running metrics
    resume: bool = False  # continue --out from its last complete checkpoint
    monitor: str = "val_acc"  # what picks the best epoch on the val part: val_acc | val_loss
    early_stop: int | None = None  # stop after N epochs without improvement of --monitor
    keep_checkpoints: int = 2  # the last K epochs' checkpoints are kept, and the best one
    class_weights: str = "none"  # none | auto: inverse class frequency as the loss's weights
    sampler: str = "uniform"  # uniform (a shuffle) | balanced (each class drawn equally often)
    strict: bool = False  # refuse a dataset with unreadable images instead of skipping them
    cache_features: bool = False  # frozen backbone: train the head on cached features
    cache_views: int = 1  # cached train augmentations per image; epoch e uses view e % K
    # The tricks of docs/recipes.md; each is off by default (the book's).
    recipe: str = "book"  # book | best: a named preset of the flags below (see recipes.py)
    optimizer: str = "sgd"  # sgd | adamw (decoupled weight decay, MXNet's adamw_update)
    label_smoothing: float = 0.0  # the target puts 1 - F on its class, F spread over all
    mixup: float = 0.0  # alpha of mixup's Beta(alpha, alpha); 0: off
    cutmix: float = 0.0  # alpha of CutMix's Beta(alpha, alpha); 0: off
    mix_off_epoch: int | None = None  # mixup/CutMix stop from this epoch (1-based) on
    ema: float | None = None  # decay of an exponential moving average of the weights
    ema_save: str = "if-better"  # if-better (on validation) | always: model.params is the EMA
    tta: int = 1  # test-time augmentation views at evaluation (1: the plain center crop)
    head_epochs: int = 0  # first train the new head alone, on cached features
    adapt_bn: bool = False  # AdaBN: BatchNorm's running statistics re-estimated on train first
    precise_bn: bool = False  # ... and after the last epoch, before its evaluation and save
    lr_find: bool = False  # --lr comes from a short LR range test (--recipe best without --lr)
    preset: list[str] = field(default_factory=list)  # the settings --recipe set (not flags)
    recipe_variant: str | None = None  # "multi-label": MULTI_LABEL_PRESETS changed the preset
    recipe_shape: str | None = None  # which --recipe best preset the train part's shape chose

    def apply_recipe(self, given=None) -> dict:
        """Set what ``--recipe`` presets, except the settings in ``given``; return them.

        ``given`` names the settings chosen explicitly (the flags on the command line);
        None: those that differ from the defaults. A preset's ``lr`` of ``"find"`` sets
        ``lr_find``: train() measures the rate first.
        """
        defaults = TrainConfig()
        if given is None:
            given = {
                f.name for f in fields(self) if getattr(self, f.name) != getattr(defaults, f.name)
            }
        implied = replaced_by(given, self.lr_schedule)
        preset, self.recipe_shape = recipe_preset(
            self.recipe, task_images_per_class(self.data, self.labels, self.label_delim)
        )
        applied = {k: v for k, v in preset.items() if k not in given | implied}
        for name, value in applied.items():
            if name == "lr" and value == FIND_LR:
                self.lr_find = True
            else:
                setattr(self, name, value)
        self.preset = list(applied)
        return applied

    def apply_multi_label_preset(self) -> dict:
        """A multi-label run's ``--recipe``: set what :data:`MULTI_LABEL_PRESETS` changes in
        the recipe's preset, and return it.

        A setting changes where the recipe set it (``preset``), or, one the general preset
        leaves alone, where it still has its default; a flag given explicitly stays.
        """
        defaults = TrainConfig()
        general = RECIPE_PRESETS[self.recipe]
        applied = {
            name: value
            for name, value in MULTI_LABEL_PRESETS.get(self.recipe, {}).items()
            if name in self.preset
            or (name not in general and getattr(self, name) == getattr(defaults, name))
        }
        for name, value in applied.items():
            setattr(self, name, value)
        if applied:
            self.preset = list(dict.fromkeys([*self.preset, *applied]))
            self.recipe_variant = "multi-label"
        return applied

    def validate(self) -> None:
        """Raise :class:`UsageError` for values no run can use; fill in the model's defaults."""
        if self.image_size is None:  # also rejects an unknown --model, naming the closest
            self.image_size = zoo.lookup(self.model).input_size
        for name in ("epochs", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1.")
        for name in ("lr", "head_lr_mult"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UsageError(f"--{name.replace('_', '-')} must be a positive number.")
        if self.wd < 0 or not 0 <= self.momentum < 1:
            raise UsageError("--wd must be >= 0 and --momentum in [0, 1).")
        if not 0 < self.crop_scale <= 1:
            raise UsageError(f"--crop-scale must be in (0, 1], got {self.crop_scale:g}.")
        if not (math.isfinite(self.eval_resize) and 1 <= self.eval_resize <= 4):
            raise UsageError(
                "--eval-resize must be between 1 (the whole image) and 4, "
                f"got {self.eval_resize:g}."
            )
        if self.lr_schedule not in SCHEDULES:
            raise UsageError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}.")
        if not (math.isfinite(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs):
            raise UsageError(
                f"--warmup-epochs must be between 0 and --epochs ({self.epochs}), "
                f"got {self.warmup_epochs:g}."
            )
        for name in ("val_split", "test_split"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and 0 <= value < 1):
                raise UsageError(
                    f"--{name.replace('_', '-')} must be a fraction in [0, 1), got {value:g}."
                )
        self.validate_imbalance()
        self.validate_labels()
        if self.monitor not in MONITORS:
            raise UsageError(f"--monitor must be one of {', '.join(MONITORS)}.")
        if self.early_stop is not None and self.early_stop < 1:
            raise UsageError("--early-stop must be at least 1 (epochs without improvement).")
        if self.keep_checkpoints < 1:
            raise UsageError("--keep-checkpoints must be at least 1: --resume needs the last.")
        if self.workers < 0:
            raise UsageError("--workers must be >= 0.")
        if self.resume and not self.out:
            raise UsageError("--resume needs --out RUN_DIR: the run directory to continue.")
        if self.cache_views < 1:
            raise UsageError("--cache-views must be at least 1.")
        if self.cache_features and self.unfreeze_at:
            raise UsageError(
                "--cache-features needs a backbone that stays frozen; --unfreeze-at changes it."
            )
        if self.accumulate > self.batch_size:
            raise UsageError("--accumulate cannot exceed --batch-size (its micro-batches).")
        self.validate_tricks()
        self.validate_batchnorm_passes()
        self.freeze_plan().validate(self.epochs)

    def validate_batchnorm_passes(self) -> None:
        """``--adapt-bn`` and ``--precise-bn``: a body whose statistics can move."""
        if self.precise_bn and self.cache_features:
            raise UsageError(
                "--precise-bn re-estimates the body's BatchNorm statistics, which "
                "--cache-features keeps frozen: leave out one of them."
            )
        if self.adapt_bn and self.pretrained == "none":
            raise UsageError(
                "--adapt-bn re-estimates a pretrained body's BatchNorm statistics on the "
                "target; from scratch (--pretrained none) there are none to adapt."
            )

    def validate_imbalance(self) -> None:
        """``--class-weights`` and ``--sampler``: one correction of the imbalance, not two."""
        if self.class_weights not in ("none", "auto"):
            raise UsageError("--class-weights must be none or auto.")
        if self.sampler not in ("uniform", "balanced"):
            raise UsageError("--sampler must be uniform or balanced.")
        if self.class_weights == "auto" and self.sampler == "balanced":
            # Refused, not warned: the run would train skewed the other way, quietly.
            raise UsageError(
                "--class-weights auto and --sampler balanced each correct the class imbalance; "
                "together they correct it twice, and a rare class then outweighs a common one "
                "by as much as it was outnumbered. Pass one of them: --sampler balanced (every "
                "class drawn equally often) or --class-weights auto (each class's loss "
                "weighted by its rarity)."
            )

    def validate_labels(self) -> None:
        """``--labels``, ``--multi-label`` and the thresholds of a multi-label run."""
        if self.multi_label and not self.labels:
            raise UsageError(
                "--multi-label needs a labels file: --labels FILE.csv, whose labels column "
                "gives each image one or more classes."
            )
        if not (math.isfinite(self.threshold) and 0 < self.threshold < 1):
            raise UsageError(f"--threshold must be in (0, 1), got {self.threshold:g}.")
        if self.thresholds not in (None, "auto"):
            raise UsageError("--thresholds must be auto (one per class, chosen on val).")

    def validate_tricks(self) -> None:
        """The checks of the recipe flags (``--recipe`` and what it presets)."""
        if self.recipe not in RECIPES:
            raise UsageError(f"--recipe must be one of {', '.join(RECIPES)}.")
        if self.recipe != "book" and self.pretrained == "none":
            raise UsageError(
                f"--recipe {self.recipe} fine-tunes a pretrained network (its head epochs and "
                "lr-find need one); from scratch (--pretrained none) use the flags themselves."
            )
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}.")
        if not (math.isfinite(self.label_smoothing) and 0 <= self.label_smoothing < 1):
            raise UsageError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing:g}.")
        for name in ("mixup", "cutmix"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UsageError(f"--{name} ALPHA must be >= 0 (0: off), got {value:g}.")
        if self.mix_off_epoch is not None and self.mix_off_epoch < 1:
            raise UsageError("--mixup-off-epoch must be at least 1.")
        if self.cache_features and (self.mixup or self.cutmix):
            raise UsageError(
                "--mixup and --cutmix mix images, but --cache-features trains on the stored "
                "features of unmixed images: leave out --cache-features, or the mixing."
            )
        if self.ema == 0:
            self.ema = None  # --ema 0: off, as --mixup 0 (a preset's EMA can be taken out)
        if self.ema is not None and not (math.isfinite(self.ema) and 0 < self.ema < 1):
            raise UsageError(
                f"--ema DECAY must be in (0, 1), e.g. 0.999, or 0 for off; got {self.ema:g}."
            )
        if self.ema_save not in EMA_SAVES:
            raise UsageError(f"--ema-save must be one of {', '.join(EMA_SAVES)}.")
        check_views(self.tta)
        if self.tta > 1 and self.cache_features:
            raise UsageError(
                f"--tta {self.tta} needs the images of each view, but --cache-features "
                "evaluates the head on stored features of the plain view: leave out one of them."
            )
        if not 0 <= self.head_epochs <= self.epochs:
            raise UsageError(
                f"--head-epochs must be between 0 and --epochs ({self.epochs}), "
                f"got {self.head_epochs}."
            )
        if self.head_epochs and self.pretrained == "none":
            raise UsageError(
                "--head-epochs trains a new head on a pretrained body first; from scratch "
                "(--pretrained none) there is neither."
            )
        if self.head_epochs and self.cache_features:
            raise UsageError(
                "--head-epochs caches the features of its head epochs itself, then trains the "
                "whole network; --cache-features keeps the backbone frozen: pass one of them."
            )

    def warnings(self, head_lr_mult_given: bool = False) -> list[str]:
        """Settings that most likely do not do what was meant, one sentence each.

        Parameters
        ----------
        head_lr_mult_given : bool
            ``--head-lr-mult`` was given, rather than left at its default.
        """
        found = []
        per_sample = self.lr < PER_SAMPLE_LR and self.batch_size >= PER_SAMPLE_BATCH
        if per_sample and self.optimizer == "sgd":  # AdamW's rates are this small
            found.append(
                f"--lr {self.lr:g} looks like a per-sample rate (lr / batch size, as d2l's "
                "text uses with step(1)); gluon-ft's --lr is per batch (trainer.step(batch_size) "
                f"divides the summed gradient), so you probably meant --lr "
                f"{self.lr * self.batch_size:g}."
            )
        if head_lr_mult_given and self.pretrained == "none" and self.head_lr_mult != 1:
            found.append(
                f"--head-lr-mult {self.head_lr_mult:g} has no effect from scratch: there is no "
                "new head, so the output layer learns at --lr like every layer "
                "(config.json: head_lr_mult_used 1.0)."
            )
        if self.optimizer == "adamw" and self.momentum:
            found.append(
                f"--momentum {self.momentum:g} has no effect under --optimizer adamw, which "
                "keeps its own moment estimates (betas 0.9, 0.999)."
            )
        return found

    def train_transform(self) -> TrainTransform:
        """The train augmentation of these settings: random crops of ``crop_scale`` or more."""
        return TrainTransform(self.image_size, scale=(self.crop_scale, 1.0))

    def sample_probabilities(self, labels):
        """``--sampler balanced``: each train item's draw probability; None: a shuffle."""
        return balanced_probabilities(labels) if self.sampler == "balanced" else None

    def test_transform(self):
        """The evaluation transform: the book's resize (``--eval-resize``) and center crop to
        ``image_size``; with ``--tta N`` the N views of :mod:`gluon_ft.data.tta`."""
        return eval_transform(self.image_size, self.tta, self.eval_resize)

    def freeze_plan(self) -> FreezePlan:
        """The :class:`gluon_ft.model.freeze.FreezePlan` of these settings."""
        return FreezePlan(
            self.freeze,
            self.bn,
            self.layer_lr_decay,
            self.unfreeze_at,
            self.accumulate,
            self.head_epochs,
            self.lr_spread,
        )
