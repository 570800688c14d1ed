"""Source models, the graft of their body onto a new classifier, and scratch twins.

The book's recipe in three named steps::

    source = load_source_model("resnet18_v2", "imagenet")      # pretrained_net
    net = graft_new_head(source, num_classes=2, head_lr_mult=10)  # finetune_net
    twin = scratch_twin("resnet18_v2", num_classes=2)             # scratch_net

It works for every classifier in :mod:`gluon_ft.model.zoo`. The zoos do not agree on where the
classifier lives (``output``, ``fc``, ``classifier``, ``output.0`` after SqueezeNet's features,
``out.3`` after NASNet's dropout), so the head is found from the block tree: the last layer that
holds weights, which must be a Dense or a 1x1 convolution. :func:`split_head` returns it with
the body (everything else); the graft shares the source's body blocks and keeps the zoo's own
new N-class layer, so pooling, flatten and dropout stay where each network puts them.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mxnet as mx
from mxnet import gluon

from gluon_ft.errors import UsageError
from gluon_ft.model import zoo
from gluon_ft.model.zoo import model_store_file
from gluon_ft.paths import mxnet_home


@dataclass
class SourceModel:
    """A pretrained (or random) source network and what it was trained to predict."""

    name: str
    net: gluon.HybridBlock
    num_classes: int
    classes: list[str] | None  # class names when known (a sidecar JSON), else None
    weights: str  # "imagenet", "none" or the params file


def build_model(
    name: str, num_classes: int, image_size: int | None = None, **kwargs
) -> gluon.HybridBlock:
    """Build a zoo network with ``num_classes`` outputs and uninitialized parameters.

    ``image_size`` is the size it will train at, default its native one (see
    :func:`gluon_ft.model.zoo.build`, which also takes ``kwargs``). A fixed-size final average pool
    becomes global average pooling (:func:`global_average_pooling`), so the network takes any
    input size its convolutions allow.
    """
    net = zoo.build(name, num_classes, image_size, **kwargs)
    global_average_pooling(net, zoo.lookup(name).input_size)
    return net


def global_average_pooling(net: gluon.Block, image_size: int) -> list[str]:
    """Replace every average pool that covers its whole input map at ``image_size`` px.

    SqueezeNet, DenseNet and Inception v3 end in a fixed-size pool (13, 7 and 8 px) that
    their native input size fills exactly: there it computes the mean of the whole map, as
    global average pooling does at every size. Returns the paths of the pools replaced.
    """
    pools = [(path, b) for path, b in walk_blocks(net) if type(b) is gluon.nn.AvgPool2D]
    if not pools:
        return []
    traced = zoo.trace_shapes(net, image_size)
    replaced = []
    for path, pool in pools:
        call = traced.get(id(pool))
        kwargs = pool._kwargs
        if call is None or any(kwargs["pad"]) or call.inputs[0][2:] != tuple(kwargs["kernel"]):
            continue
        _replace_block(net, path, gluon.nn.GlobalAvgPool2D(layout=kwargs["layout"]))
        replaced.append(path)
    return replaced


def walk_blocks(block: gluon.Block, path: str = ""):
    """Yield ``(path, block)`` for ``block`` and every descendant, parents first.

    Children come in registration order; ``path`` is the attribute path (``features.0``), the
    root's is ``""``.
    """
    yield path, block
    for name, child in block._children.items():
        yield from walk_blocks(child, f"{path}.{name}" if path else name)


def is_classifier_layer(block: gluon.Block) -> bool:
    """A Dense layer, or a 1x1 convolution (SqueezeNet, MobileNet V2/V3)."""
    if isinstance(block, gluon.nn.Dense):
        return True
    return isinstance(block, gluon.nn.Conv2D) and tuple(block._kwargs["kernel"]) == (1, 1)


def head_outputs(head: gluon.Block) -> int:
    """Number of classes a classifier layer predicts."""
    return head._units if isinstance(head, gluon.nn.Dense) else head._channels


def get_head(net: gluon.Block) -> tuple[str, gluon.Block]:
    """Return ``(path, block)`` of the network's classifier layer.

    The classifier is the last layer holding weights, in the order the network registered its
    blocks: ``output`` (Gluon ResNets, VGG), ``fc`` (GluonCV ResNet V1b/c/d, ResNeSt),
    ``output.0`` (SqueezeNet, MobileNet V2/V3), ``out.3`` (NASNet), ``classifier`` (HRNet).
    Blocks after it (SqueezeNet's pooling and flatten) hold no weights and are not the head.

    Raises
    ------
    UsageError
        The last weighted layer is not a Dense or 1x1 convolution.
    """
    weighted = [(p, b) for p, b in walk_blocks(net) if p and not b._children and b._reg_params]
    if weighted and is_classifier_layer(weighted[-1][1]):
        return weighted[-1]
    last = f"{weighted[-1][0]} ({type(weighted[-1][1]).__name__})" if weighted else "nothing"
    raise UsageError(
        f"{type(net).__name__} does not end in a classifier layer (Dense or 1x1 convolution); "
        f"its last layer with weights is {last}."
    )


@dataclass
class HeadSplit:
    """A network cut into its classifier (the head) and everything else (the body).

    ``body`` lists ``(path, block)`` for the blocks that do not contain the head, beside every
    container that does: ``[("features", ...)]`` for the book's networks, ``[("conv1", ...),
    ("bn1", ...), ("layer1", ...), ...]`` for GluonCV's ResNet V1b, and for SqueezeNet
    ``features`` plus the weightless pooling and flatten that follow its 1x1 convolution.
    Parameter names are attribute paths (``features.0.weight``, ``output.weight``): the keys of
    ``save_parameters`` files. A block registered under two paths (GoogLeNet's ``output`` is
    also ``head.2``) is listed under both.
    """

    net: gluon.Block
    head_path: str
    head: gluon.Block
    body: list[tuple[str, gluon.Block]]

    def head_params(self) -> dict[str, gluon.Parameter]:
        """The head's parameters, by attribute path."""
        mine = {id(p) for p in self.head.collect_params().values()}
        return {k: p for k, p in self.net._collect_params_with_prefix().items() if id(p) in mine}

    def body_params(self) -> dict[str, gluon.Parameter]:
        """Every other parameter, by attribute path."""
        head = self.head_params()
        return {k: p for k, p in self.net._collect_params_with_prefix().items() if k not in head}


def contains_block(block: gluon.Block, target: gluon.Block) -> bool:
    """``target`` is ``block`` or one of its descendants."""
    return any(child is target for _, child in walk_blocks(block))


def split_head(net: gluon.Block) -> HeadSplit:
    """Return the network's head (see :func:`get_head`) and its body.

    Every parameter of ``net`` is in exactly one of ``head_params()`` and ``body_params()``.

    Raises
    ------
    UsageError
        No classifier layer, or weights held by a container of the head itself (which
        neither part could own).
    """
    head_path, head = get_head(net)
    body = []

    def visit(block: gluon.Block, prefix: str) -> None:
        if block._reg_params:
            raise UsageError(
                f"{type(net).__name__}: {prefix.rstrip('.') or 'the network'} holds weights "
                "of its own around the classifier; it cannot be split into body and head."
            )
        for name, child in block._children.items():
            if child is head:
                continue
            if contains_block(child, head):
                visit(child, f"{prefix}{name}.")
            else:
                body.append((prefix + name, child))

    visit(net, "")
    return HeadSplit(net, head_path, head, body)


def _block_at(net: gluon.Block, path: str) -> gluon.Block:
    block = net
    for part in path.split("."):
        block = block._children[part]
    return block


def _replace_block(net: gluon.Block, path: str, new: gluon.Block) -> None:
    """Put ``new`` at ``path``: as the attribute it is (``net.features = ...``), else by index."""
    parent_path, _, name = path.rpartition(".")
    parent = _block_at(net, parent_path) if parent_path else net
    if getattr(parent, name, None) is parent._children[name]:
        setattr(parent, name, new)
    else:  # a numbered child of a Sequential
        parent.register_child(new, name)


def _load_imagenet(name: str, image_size: int | None) -> gluon.HybridBlock:
    target = model_store_file(name)  # raises for the models GluonCV publishes no weights for
    said = io.StringIO()  # the model store prints each attempt and failure: said once below
    try:
        root = str(mxnet_home() / "models")
        with contextlib.redirect_stdout(said):
            return build_model(name, 1000, image_size, pretrained=True, root=root)
    except Exception as err:  # the model stores raise bare requests/OSError/ValueError
        urls = re.findall(r"Downloading \S+ from (\S+?)\.\.\.", said.getvalue())
        if urls:
            what = (
                f"Could not download the ImageNet weights of {name} from {urls[-1]} "
                f"({_root_cause(err)}; {len(urls)} attempts). To train offline, fetch that "
                f"file elsewhere and put it, unzipped, at {target} (set MXNET_HOME to use "
                "another folder)"
            )
        else:
            what = (
                f"Could not load the ImageNet weights of {name} ({type(err).__name__}: "
                f"{error_summary(err, 200)}). On an offline machine, put the model store's "
                f"file at {target} (set MXNET_HOME to use another folder)"
            )
        raise UsageError(
            f"{what}; or pass --pretrained FILE.params (a params file of the same "
            "architecture), or --pretrained none to train from scratch."
        ) from None


def _root_cause(err: BaseException) -> str:
    """The socket-level reason ("Name or service not known") that requests and urllib3 wrap
    in layers of their own exceptions; else the error's own summary."""
    seen, todo = set(), [err]
    while todo:
        cause = todo.pop(0)
        if not isinstance(cause, BaseException) or id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno is not None and cause.strerror:
            return cause.strerror
        todo += [*cause.args, getattr(cause, "reason", None), cause.__cause__, cause.__context__]
    return f"{type(err).__name__}: {error_summary(err, 200)}"


def params_num_classes(path: str | Path, head: str = "output") -> int | None:
    """Read the class count stored in a params file (the head's weight rows), if any."""
    saved = mx.nd.load(str(path))
    if not isinstance(saved, dict):
        return None
    for key in (f"{head}.weight", f"{head}.bias"):
        if key in saved:
            return int(saved[key].shape[0])
    return None


def sidecar_path(params_file: str | Path) -> Path:
    """The JSON beside a params file that names its model and classes."""
    return Path(params_file).with_suffix(".json")


def load_parameters(
    net: gluon.Block,
    path: str | Path,
    ctx: list[mx.Context] | mx.Context,
    *,
    what: str,
    fits: str = "this network",
    hint: str = "Was it saved from the same architecture and number of classes?",
) -> None:
    """``net.load_parameters`` with a one-paragraph :class:`UsageError` when it cannot fit.

    Parameters are cast to the network's own dtype, so a run trained in float16 loads into
    a float32 network for prediction and export.

    Parameters
    ----------
    net : gluon.Block
        The network to fill.
    path : str or Path
        A ``save_parameters`` file.
    ctx : Context or list of Context
        Where the parameters go.
    what : str
        What the file is, for the message ("Model parameters").
    fits, hint : str
        What it must fit, and what to do when it does not, for the message.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} {path} does not exist.")
    try:
        net.load_parameters(str(path), ctx=ctx, cast_dtype=True, dtype_source="current")
    except (mx.base.MXNetError, AssertionError, ValueError, KeyError, OSError) as err:
        why = describe_mismatch(net, path) or error_summary(err)
        raise UsageError(f"{what} {path} does not fit {fits} ({why}). {hint}") from None


def error_summary(err: BaseException, limit: int = 300) -> str:
    """The line of an exception's text that says what went wrong, cut at a word.

    MXNet's text starts with "Traceback (most recent call last):" and the C++ frames; its
    reason ("Check failed: ...") comes last.
    """
    frames = ("Traceback", "File ", "[bt]", "Stack trace")
    lines = [line.strip() for line in str(err).strip().splitlines()]
    lines = [line for line in lines if line and not line.startswith(frames)]
    if not lines:
        return type(err).__name__
    line = lines[-1].removeprefix("MXNetError: ")
    if len(line) > limit:
        line = line[:limit].rsplit(" ", 1)[0] + " ..."
    return line


def describe_mismatch(net: gluon.Block, path: str | Path, shown: int = 3) -> str | None:
    """Which parameters a file lacks, has extra, or holds in another shape than ``net``'s.

    ``None`` when the file cannot be read as parameters, or its names and shapes all fit (so
    the reason lies elsewhere).
    """
    try:
        saved = mx.nd.load(str(path))
    except mx.base.MXNetError:
        return None
    if not isinstance(saved, dict):
        return None
    wanted = net._collect_params_with_prefix()
    missing = [name for name in wanted if name not in saved]
    unexpected = [name for name in saved if name not in wanted]
    reshaped = [
        f"{name} {tuple(saved[name].shape)} for {wanted[name].shape}"
        for name in wanted
        if name in saved and wanted[name].shape and 0 not in wanted[name].shape
        if tuple(saved[name].shape) != tuple(wanted[name].shape)
    ]
    parts = []
    for names, what in (
        (missing, f"of the network's {len(wanted)} parameters missing from the file"),
        (unexpected, "in the file that the network does not have"),
        (reshaped, "of another shape"),
    ):
        if names:
            more = f", ... {len(names) - shown} more" if len(names) > shown else ""
            parts.append(f"{len(names)} {what}: {', '.join(names[:shown])}{more}")
    return "; ".join(parts) or None


def _load_params_file(
    name: str, path: Path, image_size: int | None
) -> tuple[gluon.HybridBlock, int, list | None]:
    if not path.is_file():
        raise UsageError(f"Params file {path} does not exist.")
    if path.suffix.lower() == ".json":
        raise UsageError(
            f"--pretrained {path} is a JSON file (the note that names a params file's model "
            f"and classes), not the weights: pass the .params file saved with it, such as "
            f"{path.with_suffix('.params')}."
        )
    meta = {}
    if sidecar_path(path).is_file():
        try:
            meta = json.loads(sidecar_path(path).read_text())
        except (OSError, ValueError) as err:
            raise UsageError(f"{sidecar_path(path)} is not valid JSON: {err}") from None
    if meta.get("model") not in (None, name):
        raise UsageError(
            f"{path} holds a {meta['model']} (per {sidecar_path(path).name}), not a {name}; "
            f"use --model {meta['model']}."
        )
    classes = meta.get("classes")
    try:
        head_path, _ = get_head(build_model(name, 1))
        num_classes = len(classes) if classes else params_num_classes(path, head_path)
        if num_classes is None:
            raise UsageError(f"{path} has no {head_path}.weight; is it a {name} params file?")
    except (mx.base.MXNetError, AssertionError) as err:  # not a params file
        raise UsageError(
            f"{path} is not a parameters file that fits the {name} architecture "
            f"({error_summary(err)}). Pass a .params file saved by gluon-ft or MXNet, and the "
            "--model it was trained with."
        ) from None
    net = build_model(name, num_classes, image_size)
    load_parameters(
        net,
        path,
        mx.cpu(),
        what="Params file",
        fits=f"the {name} architecture",
        hint="Pass the --model it was trained with.",
    )
    return net, num_classes, classes


def load_source_model(
    name: str, pretrained: str = "imagenet", image_size: int | None = None
) -> SourceModel:
    """Return the source network for ``name`` with the chosen weights, on the CPU.

    Parameters
    ----------
    name : str
        A Gluon model zoo name (``resnet18_v2``) or a GluonCV one (``resnet50_v1d``).
    pretrained : str
        ``imagenet`` (the model store under ``$MXNET_HOME/models``), ``none`` (Xavier), or
        the path of a ``.params`` file saved from the same architecture (its class count is
        read from the file; class names from a sidecar ``.json`` when there is one).
    image_size : int, optional
        The size the graft will train at; only ResNeSt is built differently for it.

    Raises
    ------
    UsageError
        Unknown model, weights that cannot be had, or a params file of another architecture.
    """
    name = zoo.lookup(name).name
    if pretrained == "imagenet":
        net = _load_imagenet(name, image_size)
        return SourceModel(name, net, head_outputs(get_head(net)[1]), None, "imagenet")
    if pretrained == "none":
        net = build_model(name, 1000, image_size)
        net.initialize(mx.init.Xavier(), ctx=mx.cpu())
        return SourceModel(name, net, 1000, None, "none")
    path = Path(os.path.expanduser(pretrained))
    net, num_classes, classes = _load_params_file(name, path, image_size)
    return SourceModel(name, net, num_classes, classes, str(path))


def graft_new_head(
    source: SourceModel,
    num_classes: int,
    head_lr_mult: float = 10.0,
    ctx: list[mx.Context] | None = None,
) -> gluon.HybridBlock:
    """Return a new network: ``source``'s body under a new ``num_classes`` classifier.

    For the book's networks (``features`` + ``output``) this is the book's
    ``finetune_net.features = pretrained_net.features``. For the others, every body block of
    :func:`split_head` is taken from the source the same way: the body is shared (the same
    Parameters), and only the classifier layer is new: the zoo's own N-class layer of the same
    kind (Dense, or 1x1 convolution for SqueezeNet and MobileNet), Xavier-initialized, learning
    ``head_lr_mult`` times faster.

    Parameters
    ----------
    source : SourceModel
        From :func:`load_source_model`.
    num_classes : int
        Classes of the target task.
    head_lr_mult : float
        ``lr_mult`` of the new head's parameters (the book: 10).
    ctx : list of Context, optional
        Devices to place every parameter on; the CPU by default.
    """
    ctx = ctx or [mx.cpu()]
    # A predict-mode forward on the source may still be reordering its weights in place for
    # oneDNN; copies made meanwhile (reset_ctx below) were seen to come out scrambled.
    mx.nd.waitall()
    net = build_model(source.name, num_classes)
    split = split_head(net)
    if split.head_path == "output" and [path for path, _ in split.body] == ["features"]:
        net.features = source.net.features  # the book's graft, verbatim
    else:
        for path, _ in split.body:
            _replace_block(net, path, _block_at(source.net, path))
    # The book's new head is Xavier. Set on the weight itself, as a layer's own initializer
    # wins over initialize()'s argument (VGG's Dense asks for normal(0.01)); biases stay zero.
    split.head.weight.init = mx.init.Xavier()
    split.head.initialize(ctx=ctx)
    split.head.collect_params().setattr("lr_mult", head_lr_mult)
    # The source lives on the CPU; without this, forward on a GPU raises
    # "Parameter ... was not initialized on context".
    net.collect_params().reset_ctx(ctx)
    return net


def scratch_twin(
    name: str,
    num_classes: int,
    ctx: list[mx.Context] | None = None,
    image_size: int | None = None,
) -> gluon.HybridBlock:
    """Return the same architecture with ``num_classes`` outputs, Xavier-initialized everywhere.

    ``image_size`` is the size it will train at (see :func:`build_model`).
    """
    net = build_model(name, num_classes, image_size)
    net.initialize(mx.init.Xavier(), ctx=ctx or [mx.cpu()])
    return net


def source_class_names(source: SourceModel) -> list[str] | None:
    """The names of the classes ``source``'s output layer predicts, in output order.

    ImageNet weights give GluonCV's ImageNet-1k labels (``[934]`` is ``"hotdog"``); a params
    file gives the names in its sidecar JSON; random weights give None.
    """
    if source.classes:
        return list(source.classes)
    if source.weights == "imagenet" and source.num_classes == 1000:
        from gluoncv.data import ImageNet1kAttr

        return list(ImageNet1kAttr().classes)
    return None


def init_head_from_source_class(
    net: gluon.HybridBlock, source: SourceModel, source_class: int, target_class: int = 0
) -> None:
    """Start row ``target_class`` of ``net``'s new head as ``source``'s row ``source_class``.

    The book's exercise 4: the new head's "hotdog" row starts from the ImageNet output
    layer's class 934 (``hotdog``), weight and bias. With the body shared by the graft, the
    new network's logit ``target_class`` then equals the source's logit ``source_class`` before
    any training. A head whose shape is still deferred gets its input size from the source.

    Raises
    ------
    UsageError
        A class index outside either head, or heads of different input sizes.
    """
    _, head = get_head(net)
    _, source_head = get_head(source.net)
    if not 0 <= source_class < head_outputs(source_head):
        raise UsageError(
            f"Source class {source_class} does not exist: the source predicts "
            f"{head_outputs(source_head)} classes."
        )
    if not 0 <= target_class < head_outputs(head):
        raise UsageError(
            f"Target class {target_class} does not exist: the new head predicts "
            f"{head_outputs(head)} classes."
        )
    mx.nd.waitall()  # see graft_new_head: the source may still be reordering its weights
    for name in ("weight", "bias"):
        mine, theirs = getattr(head, name, None), getattr(source_head, name, None)
        if mine is None or theirs is None:
            continue
        row = theirs.data(theirs.list_ctx()[0])[source_class]
        if mine._data is None:  # deferred: the input size is known from the source
            mine.shape = (mine.shape[0], *theirs.shape[1:])
            mine._finish_deferred_init()
        if mine.shape[1:] != theirs.shape[1:]:
            raise UsageError(
                f"The heads do not match: {mine.name} rows are {mine.shape[1:]}, the source's "
                f"{theirs.shape[1:]}."
            )
        for data in mine.list_data():
            data[target_class] = row.as_in_context(data.context)


# Source classes that look most like a target class a source may lack (Food-101 without its
# hot dogs: a sausage in a split bun is closest to a lobster roll or a pulled-pork sandwich).
RELATED_CLASS_NAMES = {
    "hotdog": (
        "frankfurter",
        "sausage",
        "bratwurst",
        "lobster_roll_sandwich",
        "pulled_pork_sandwich",
        "hamburger",
    ),
}


def _name_key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _name_words(name: str) -> set[str]:
    return {w for w in re.split(r"[^a-z0-9]+", name.lower()) if w}


def related_source_class(target: str, source_classes: Sequence[str]) -> tuple[int, str, str]:
    """Return ``(index, name, why)``: the source class closest to the target class ``target``.

    In order: the same name (ignoring case, spaces, ``_`` and ``-``: ImageNet's ``hotdog``
    is index 934, Food-101's would be ``hot_dog``); a known relative from
    :data:`RELATED_CLASS_NAMES`; the most words in common (``striped-star`` and
    ``speckled-star``), ties to the closer spelling; else the closest spelling alone.
    """
    if not source_classes:
        raise UsageError("The source model's class names are unknown; name a class index.")
    keys = [_name_key(c) for c in source_classes]
    if _name_key(target) in keys:
        index = keys.index(_name_key(target))
        return index, source_classes[index], "the same class"
    for relative in RELATED_CLASS_NAMES.get(_name_key(target), ()):
        if _name_key(relative) in keys:
            index = keys.index(_name_key(relative))
            return index, source_classes[index], f"a known relative of {target}"
    words = _name_words(target)

    def score(i: int) -> tuple[int, float]:
        spelling = difflib.SequenceMatcher(None, target.lower(), source_classes[i].lower())
        return len(words & _name_words(source_classes[i])), spelling.ratio()

    index = max(range(len(source_classes)), key=score)
    shared = sorted(words & _name_words(source_classes[index]))
    why = f"shares {', '.join(shared)}" if shared else "the closest spelling (no shared word)"
    return index, source_classes[index], why
