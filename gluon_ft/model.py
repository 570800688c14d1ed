"""Source models, the graft of their features onto a new output, and scratch twins.

The book's recipe in three named steps::

    source = load_source_model("resnet18_v2", "imagenet")      # pretrained_net
    net = graft_new_head(source, num_classes=2, head_lr_mult=10)  # finetune_net
    twin = scratch_twin("resnet18_v2", num_classes=2)             # scratch_net
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import mxnet as mx
from mxnet import gluon

from gluon_ft.data import mxnet_home
from gluon_ft.errors import UsageError

# Attribute names under which the zoo networks keep their classifier, in lookup order.
HEAD_NAMES = ("output", "fc")


@dataclass
class SourceModel:
    """A pretrained (or random) source network and what it was trained to predict."""

    name: str
    net: gluon.HybridBlock
    num_classes: int
    classes: list[str] | None  # class names when known (a sidecar JSON), else None
    weights: str  # "imagenet", "none" or the params file


def _zoo_constructor(name: str):
    """Return ``(get_model, family)`` for a model name from Gluon's or GluonCV's zoo."""
    from mxnet.gluon.model_zoo import vision

    try:
        vision.get_model(name)  # cheap: builds the block, allocates nothing
        return vision.get_model, "gluon"
    except ValueError:
        pass
    import gluoncv

    if name.lower() in gluoncv.model_zoo.get_model_list():
        return gluoncv.model_zoo.get_model, "gluoncv"
    from difflib import get_close_matches

    names = sorted(set(vision_model_names()) | set(gluoncv.model_zoo.get_model_list()))
    close = get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UsageError(f"Unknown model {name!r}.{hint} `gluon-ft models` lists every name.")


def vision_model_names() -> list[str]:
    """Names of the Gluon model zoo (``mxnet.gluon.model_zoo.vision``)."""
    from mxnet.gluon.model_zoo import vision

    return sorted(
        n
        for n in dir(vision)
        if n[0].islower() and any(ch.isdigit() for ch in n) and callable(getattr(vision, n))
    )


def build_model(name: str, num_classes: int) -> gluon.HybridBlock:
    """Build a zoo network with ``num_classes`` outputs and uninitialized parameters."""
    get_model, _ = _zoo_constructor(name)
    return get_model(name, classes=num_classes)


def get_head(net: gluon.Block) -> tuple[str, gluon.Block]:
    """Return ``(attribute name, block)`` of the network's classifier layer."""
    for attr in HEAD_NAMES:
        head = getattr(net, attr, None)
        if isinstance(head, gluon.Block):
            return attr, head
    raise UsageError(f"{type(net).__name__} has no classifier named {' or '.join(HEAD_NAMES)}.")


def model_store_file(name: str) -> Path:
    """Path where the model store keeps ``name``'s ImageNet weights (not necessarily present)."""
    get_model, family = _zoo_constructor(name)
    if family == "gluon":
        from mxnet.gluon.model_zoo.model_store import short_hash
    else:
        from gluoncv.model_zoo.model_store import short_hash
    try:
        return mxnet_home() / "models" / f"{name}-{short_hash(name)}.params"
    except (KeyError, ValueError):
        raise UsageError(f"{name} has no ImageNet weights in its model store.") from None


def _load_imagenet(name: str) -> gluon.HybridBlock:
    get_model, _ = _zoo_constructor(name)
    target = model_store_file(name)
    try:
        return get_model(name, pretrained=True, root=str(mxnet_home() / "models"))
    except Exception as err:  # the model stores raise bare requests/OSError/ValueError
        raise UsageError(
            f"Could not load the ImageNet weights of {name} ({type(err).__name__}: "
            f"{str(err)[:200]}). On an offline machine, put the model store's file at "
            f"{target} (set MXNET_HOME to use another folder), or pass "
            "--pretrained FILE.params (a params file of the same architecture), or "
            "--pretrained none to train from scratch."
        ) from None


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


def _load_params_file(name: str, path: Path) -> tuple[gluon.HybridBlock, int, list | None]:
    if not path.is_file():
        raise UsageError(f"Params file {path} does not exist.")
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
        head_attr, _ = get_head(build_model(name, 1))
        num_classes = len(classes) if classes else params_num_classes(path, head_attr)
        if num_classes is None:
            raise UsageError(f"{path} has no {head_attr}.weight; is it a {name} params file?")
        net = build_model(name, num_classes)
        net.load_parameters(str(path), ctx=mx.cpu())
    except mx.base.MXNetError as err:
        first = str(err).strip().splitlines()[0][:300]
        raise UsageError(
            f"{path} does not fit the {name} architecture ({first}). Pass the --model it was "
            "trained with."
        ) from None
    return net, num_classes, classes


def load_source_model(name: str, pretrained: str = "imagenet") -> SourceModel:
    """Return the source network for ``name`` with the chosen weights, on the CPU.

    Parameters
    ----------
    name : str
        A Gluon model zoo name (``resnet18_v2``) or a GluonCV one (``resnet50_v1d``).
    pretrained : str
        ``imagenet`` (the model store under ``$MXNET_HOME/models``), ``none`` (Xavier), or
        the path of a ``.params`` file saved from the same architecture (its class count is
        read from the file; class names from a sidecar ``.json`` when there is one).

    Raises
    ------
    UsageError
        Unknown model, weights that cannot be had, or a params file of another architecture.
    """
    if pretrained == "imagenet":
        net = _load_imagenet(name)
        return SourceModel(name, net, get_head(net)[1]._units, None, "imagenet")
    if pretrained == "none":
        net = build_model(name, 1000)
        net.initialize(mx.init.Xavier(), ctx=mx.cpu())
        return SourceModel(name, net, 1000, None, "none")
    path = Path(os.path.expanduser(pretrained))
    net, num_classes, classes = _load_params_file(name, path)
    return SourceModel(name, net, num_classes, classes, str(path))


def graft_new_head(
    source: SourceModel,
    num_classes: int,
    head_lr_mult: float = 10.0,
    ctx: list[mx.Context] | None = None,
) -> gluon.HybridBlock:
    """Return a new network: ``source``'s features under a new ``num_classes`` classifier.

    This is the book's ``finetune_net.features = pretrained_net.features``: the features are
    shared (the same Parameters), the new head is Xavier-initialized and learns
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
    net = build_model(source.name, num_classes)
    head_attr, _ = get_head(net)
    net.features = source.net.features
    head = getattr(net, head_attr)
    head.initialize(mx.init.Xavier(), ctx=ctx)
    head.collect_params().setattr("lr_mult", head_lr_mult)
    # The source lives on the CPU; without this, forward on a GPU raises
    # "Parameter ... was not initialized on context".
    net.collect_params().reset_ctx(ctx)
    return net


def scratch_twin(
    name: str, num_classes: int, ctx: list[mx.Context] | None = None
) -> gluon.HybridBlock:
    """Return the same architecture with ``num_classes`` outputs, Xavier-initialized everywhere."""
    net = build_model(name, num_classes)
    net.initialize(mx.init.Xavier(), ctx=ctx or [mx.cpu()])
    return net
