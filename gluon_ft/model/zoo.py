"""The catalogue of fine-tunable models: every ImageNet classifier of Gluon's and GluonCV's zoos.

A name is in the catalogue when it builds an image classifier (image in, class scores out)
whose class count can be chosen. Gluon's model zoo (``mxnet.gluon.model_zoo.vision``) comes
first; GluonCV adds the names Gluon lacks. Both zoos hold models for other tasks as well
(detection, segmentation, pose, action, depth, tracking): those are left out by name, and a few
classifiers are left out for a stated reason (:data:`EXCLUDED`). Everything else is found by
asking the zoos, not listed here.

The per-model tables hold only exceptions: :data:`INPUT_SIZES` (the native input size where
it is not 224) and :data:`EXCEPTIONS` (constructor arguments and weight files that differ).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import re
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import gluon

from gluon_ft.errors import UsageError
from gluon_ft.paths import mxnet_home

GLUON, GLUONCV = "gluon", "gluoncv"
DEFAULT_INPUT_SIZE = 224
# The book's test transform resizes to 256 and crops 224; GluonCV's crop ratio 0.875 is the
# same. Every model keeps that ratio at its own input size (299 -> resize 342).
TEST_RESIZE_RATIO = 256 / 224

# GluonCV names that are not image classifiers (tasks other than classification).
OTHER_TASKS = re.compile(
    r"^(ssd|yolo3|faster_rcnn|mask_rcnn|doublehead_rcnn|custom|center_net|fcn|psp|deeplab"
    r"|icnet|fastscnn|danet|simple_pose|mobile_pose|alpha_pose|monodepth2|siamrpn|smot|i3d"
    r"|c3d|p3d|r2plus1d|slowfast)_"
    r"|_(voc|coco|ade|citys|mhpv1|ucf101|hmdb51|kinetics400|kinetics700|sthsthv2|custom)$"
)

# Classifiers that are left out, and why; the reason is shown to whoever asks for one.
EXCLUDED = {
    r"^cifar_": "is a CIFAR-10 classifier for 32 px images; its weights are not ImageNet's",
    r"_int8$": "is a quantized inference graph, which cannot be trained",
    r"_gn$": "uses GluonCV's GroupNorm, which fails under hybridize() with MXNet 1.9.1",
    r"^(se_)?resnext101e_": "cannot be built: its GluonCV 0.10.5 constructor raises KeyError",
    r"_0\.\d+$": (
        "is a pruned ResNet whose constructor ignores `classes` (its head shape is read from "
        "a JSON file), so no N-class head can be built"
    ),
    r"^hrnet_.*_s$": "is a segmentation network",
}

# Native input sizes other than 224: the sizes GluonCV's own image-classification estimator
# uses (gluoncv.auto ... image_classification.py), and Xception's 299.
INPUT_SIZES = {
    "inceptionv3": 299,
    "googlenet": 299,
    "xception": 299,
    "xception71": 299,
    "resnest101": 256,
    "resnest200": 320,
    "resnest269": 416,
}

# Families that differ from "get_model(name, classes=N), weights in the store as <name>".
EXCEPTIONS = {
    # HRNet takes ``num_classes`` (and silently swallows ``classes``); its weights are stored
    # as hrnet_w18_cls for hrnet_w18_c.
    r"^hrnet_": {"classes_kwarg": "num_classes", "store_name": (r"_c$", "_cls")},
    # NASNet's default (use_aux=True) returns (scores, auxiliary scores) even in predict mode.
    r"^nasnet_": {"kwargs": {"use_aux": False}},
    # GluonCV 0.10.5 "loads" these from the resnet*_v1d / senet_154 files, which do not fit.
    r"^resnet\d+_v1e$|^senet_154e$": {"weights_published": False},
    # ResNeSt's DropBlock masks have the feature maps' size, fixed when built (default: for
    # 224 px, whatever the model): the training image size must be passed in.
    r"^resnest": {"image_size_kwarg": "input_size"},
}


@dataclass(frozen=True)
class ZooModel:
    """One catalogue entry: where a name comes from and its defaults."""

    name: str
    zoo: str  # "gluon" or "gluoncv"
    input_size: int  # the size its ImageNet weights were trained and evaluated at
    weights_published: bool  # the zoo's model store has ImageNet weights for it

    @property
    def test_resize(self) -> int:
        """The test transform's resize before the center crop (the book's ratio)."""
        return max(self.input_size, int(round(self.input_size * TEST_RESIZE_RATIO)))


def _gluon_store():
    from mxnet.gluon.model_zoo import model_store

    return model_store


def _gluoncv_store():
    from gluoncv.model_zoo import model_store

    return model_store


def _exception(name: str) -> dict:
    return next((rule for p, rule in EXCEPTIONS.items() if re.search(p, name)), {})


def _store_name(name: str) -> str:
    """The name of ``name``'s weights in its zoo's model store."""
    pattern, replacement = _exception(name).get("store_name", ("$", ""))
    return re.sub(pattern, replacement, name)


def _excluded_reason(name: str) -> str | None:
    for pattern, reason in EXCLUDED.items():
        if re.search(pattern, name):
            return reason
    return None


@functools.lru_cache(maxsize=1)
def _catalogue() -> dict[str, ZooModel]:
    import gluoncv

    entries: dict[str, ZooModel] = {}
    # Gluon's zoo keeps its names only inside get_model(); its model store lists the same 34.
    for name in _gluon_store()._model_sha1:
        entries[name] = ZooModel(name, GLUON, INPUT_SIZES.get(name, DEFAULT_INPUT_SIZE), True)
    published = set(_gluoncv_store().pretrained_model_list())
    for name in gluoncv.model_zoo.get_model_list():
        if name in entries or OTHER_TASKS.search(name) or _excluded_reason(name):
            continue
        size = INPUT_SIZES.get(name, DEFAULT_INPUT_SIZE)
        weights = _exception(name).get("weights_published", _store_name(name) in published)
        entries[name] = ZooModel(name, GLUONCV, size, weights)
    return entries


def model_names() -> list[str]:
    """Every fine-tunable name, Gluon's zoo first, in each zoo's own order."""
    return list(_catalogue())


def lookup(name: str) -> ZooModel:
    """Return the catalogue entry for ``name`` (case-insensitive).

    Raises
    ------
    UsageError
        An unknown name (with the closest names), or a zoo model that is not a supported
        classifier (with the reason).
    """
    key = name.strip().lower()
    entry = _catalogue().get(key)
    if entry is not None:
        return entry
    reason = _excluded_reason(key)
    if reason is None and _in_gluoncv(key):
        reason = "is not an image classifier (detection, segmentation, pose, video or depth)"
    if reason:
        raise UsageError(
            f"{name!r} {reason}; gluon-ft fine-tunes ImageNet classifiers. `gluon-ft models` "
            "lists them."
        )
    close = get_close_matches(key, model_names(), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UsageError(f"Unknown model {name!r}.{hint} `gluon-ft models` lists every name.")


def _in_gluoncv(name: str) -> bool:
    import gluoncv

    return name in gluoncv.model_zoo.get_model_list()


def build(
    name: str, num_classes: int, image_size: int | None = None, **kwargs
) -> gluon.HybridBlock:
    """Build zoo network ``name`` with ``num_classes`` outputs, parameters not initialized.

    ``image_size`` is the size it will train at (default: its native size); only ResNeSt's
    construction depends on it. ``kwargs`` go to the zoo constructor (``pretrained=True``).
    """
    entry = lookup(name)
    rule = _exception(entry.name)
    kwargs = {**rule.get("kwargs", {}), **kwargs, rule.get("classes_kwarg", "classes"): num_classes}
    if "image_size_kwarg" in rule:
        kwargs[rule["image_size_kwarg"]] = image_size or entry.input_size
    if entry.zoo == GLUON:
        from mxnet.gluon.model_zoo import vision

        return vision.get_model(entry.name, **kwargs)
    import gluoncv

    return gluoncv.model_zoo.get_model(entry.name, **kwargs)


def model_store_file(name: str) -> Path:
    """Where the model store keeps ``name``'s ImageNet weights (present or not).

    Raises
    ------
    UsageError
        The zoo publishes no ImageNet weights for ``name``.
    """
    entry = lookup(name)
    if not entry.weights_published:
        raise UsageError(
            f"{entry.name} has no published ImageNet weights (GluonCV ships the architecture "
            "only). Train it with --pretrained none, or pass --pretrained FILE.params."
        )
    store = _gluon_store() if entry.zoo == GLUON else _gluoncv_store()
    stored = _store_name(entry.name)
    return mxnet_home() / "models" / f"{stored}-{store.short_hash(stored)}.params"


def weights_status(name: str) -> str:
    """``cached`` (in the local model store), ``not cached``, or ``none`` (never published)."""
    if not lookup(name).weights_published:
        return "none"
    return "cached" if model_store_file(name).is_file() else "not cached"


def infer_shapes(net: gluon.HybridBlock, image_size: int) -> tuple[dict, tuple]:
    """Shapes of every parameter and of the output for a ``(1, 3, S, S)`` input, symbolically.

    Parameters whose shape is already known (loaded weights) constrain the inference, so a
    pretrained VGG asked for 64 px inputs fails here rather than at the first batch. The graph
    is the training one (ResNeSt's DropBlock only acts there). Nothing is computed or allocated.

    Raises
    ------
    mxnet.base.MXNetError
        The network cannot take that input size.
    """
    with mx.autograd.train_mode():
        out = net(mx.sym.var("data"))
    if isinstance(out, list | tuple):
        raise mx.base.MXNetError(f"{type(net).__name__} returns {len(out)} outputs, not one")
    arguments = out.list_arguments()
    inputs = set(arguments)
    known = {
        p.name: p.shape
        for p in net.collect_params().values()
        if p.name in inputs and p.shape and all(p.shape)
    }
    # Symbol.infer_shape prints its arguments to stdout before raising; keep stdout clean.
    with contextlib.redirect_stdout(io.StringIO()):
        args, outs, _ = out.infer_shape(data=(1, 3, image_size, image_size), **known)
    shapes = dict(zip(arguments, args))
    shapes.pop("data")
    return shapes, outs[0]


@dataclass(frozen=True)
class Traced:
    """The shapes one block received and returned in a symbolic pass (lists: HRNet's branches)."""

    inputs: tuple[tuple[int, ...], ...]
    outputs: tuple[tuple[int, ...], ...]


def _symbols(value) -> list:
    if isinstance(value, mx.sym.Symbol):
        return [value]
    if isinstance(value, list | tuple):
        return [s for item in value for s in _symbols(item)]
    return []


def trace_shapes(net: gluon.HybridBlock, image_size: int) -> dict[int, Traced]:
    """Input and output shapes of every block ``net`` calls for a ``(1, 3, S, S)`` image.

    Keys are ``id(block)``; a block called twice keeps its first call, a block never called
    as a whole (a list of branches) is absent. One symbolic pass in predict mode, as
    :func:`infer_shapes`: nothing is computed or allocated.

    Raises
    ------
    mxnet.base.MXNetError
        The network cannot take that input size.
    """
    calls: dict[int, tuple[list, list]] = {}
    handles = []

    def record(block, inputs, output):
        calls.setdefault(id(block), (_symbols(inputs), _symbols(output)))

    net.apply(lambda block: handles.append(block.register_forward_hook(record)))
    try:
        net(mx.sym.var("data"))
    finally:
        for handle in handles:
            handle.detach()
    symbols = [s for ins, outs in calls.values() for s in ins + outs]
    # Symbol.infer_shape prints its arguments to stdout before raising; keep stdout clean.
    with contextlib.redirect_stdout(io.StringIO()):
        _, shapes, _ = mx.sym.Group(symbols).infer_shape(data=(1, 3, image_size, image_size))
    if shapes is None:  # some shape could not be decided (a warning, not an error)
        raise mx.base.MXNetError(f"the shapes of {type(net).__name__} are not all known")
    found, at = {}, iter(shapes)
    for key, (ins, outs) in calls.items():
        found[key] = Traced(tuple(next(at) for _ in ins), tuple(next(at) for _ in outs))
    return found


def check_input_size(net: gluon.HybridBlock, name: str, image_size: int) -> None:
    """Raise :class:`UsageError` unless ``net`` maps ``image_size`` px images to class scores."""
    try:
        _, out_shape = infer_shapes(net, image_size)
        if len(out_shape) == 2:
            return
        problem = f"its output would have shape {out_shape}, not (batch, classes)"
    except Exception as err:  # the zoo's own code may fail first (ResNeSt: ZeroDivisionError)
        problem = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    native = lookup(name).input_size
    raise UsageError(
        f"{name} cannot take {image_size} px images ({problem}). It was built for {native} px; "
        f"pass --image-size {native}, or pick a model with global pooling (`gluon-ft models`)."
    )


def min_input_size(name: str) -> int:
    """The smallest images ``name`` sees anything in: its total downsampling (ResNets: 32).

    Smaller ones pass through (the convolutions pad), but the last feature map is then a
    single pixel made mostly of padding. Measured symbolically at the native size: the
    native size over the smallest feature map above one pixel (224 / 7).
    """
    native = lookup(name).input_size
    try:
        traced = trace_shapes(build(name, 2), native)
    except Exception:  # noqa: BLE001  the zoo's own code may fail; check_input_size says why
        return 1
    sides = [s[-1] for t in traced.values() for s in t.outputs if len(s) == 4 and s[-1] > 1]
    return math.ceil(native / min(sides)) if sides else 1


@dataclass(frozen=True)
class ModelInfo:
    """One row of ``gluon-ft models``."""

    name: str
    zoo: str
    family: str  # the network's class, e.g. ResNetV1b for resnet50_v1d
    input_size: int
    test_resize: int
    params: int  # with the 1000-class ImageNet head, at the native input size
    weights: str  # see weights_status()

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def describe(name: str) -> ModelInfo:
    """Build ``name`` (1000 classes, nothing allocated) and report its catalogue row."""
    entry = lookup(name)
    net = build(entry.name, 1000)
    shapes, _ = infer_shapes(net, entry.input_size)
    return ModelInfo(
        name=entry.name,
        zoo=entry.zoo,
        family=type(net).__name__.lstrip("_"),
        input_size=entry.input_size,
        test_resize=entry.test_resize,
        params=int(sum(np.prod(s) for s in shapes.values())),
        weights=weights_status(entry.name),
    )


def matching_names(pattern: str | None = None) -> list[str]:
    """Catalogue names containing ``pattern`` (a regex, case-insensitive); all if ``None``."""
    if not pattern:
        return model_names()
    try:
        regex = re.compile(pattern, re.IGNORECASE)
    except re.error as err:
        raise UsageError(f"{pattern!r} is not a valid regular expression ({err}).") from None
    names = [n for n in model_names() if regex.search(n)]
    if not names:
        raise UsageError(f"No supported model matches {pattern!r}; `gluon-ft models` lists all.")
    return names
