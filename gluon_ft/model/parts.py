"""The named parts of a network: stem, stage1..stageN by resolution, tail and head.

A stage is a group of blocks that compute at one spatial resolution, found by a symbolic shape
pass (:func:`gluon_ft.model.zoo.trace_shapes`), never by how a zoo happens to nest its containers
(GluonCV's deep stem is a container; DenseNet interleaves transitions; Inception v3 has 16
mixed blocks). For a ``S`` px image, a block whose output is ``H`` px high computes at level
``log2(S / H)``; then

- ``stem``: the blocks at full and half resolution (levels 0 and 1);
- ``stageK``: the K-th level from a quarter of the input on: ResNet's ``conv2_x`` (``layer1``,
  1/4) is ``stage1`` and its ``conv5_x`` (``layer4``, 1/32) ``stage4``, as a feature
  pyramid's C2..C5;
- ``tail``: the blocks after global pooling (VGG's Dense layers, MobileNet v3's last 1x1 conv);
- ``output``: the head, the classifier layer of :func:`gluon_ft.model.graft.get_head`.

A block belongs to the level of its output, so a block that downsamples (a ResNet unit with
stride 2, DenseNet's transition, Inception's Mixed_6a) opens the next stage; a block that comes
back up to a finer map (HRNet's fusion) stays at the coarsest level reached so far. Every
parameter is in exactly one of these parts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
from mxnet import gluon

from gluon_ft.errors import UsageError
from gluon_ft.model import zoo
from gluon_ft.model.graft import split_head

ALL = "all"
# Level 2 (1/4 of the input) opens stage1, as ResNet's layer1 after its stride-2 convolution
# and max pool.
FIRST_STAGE_LEVEL = 2
# The shape pass runs at 224 px, which every catalogue model takes; then at the other native
# sizes, for networks that only take those.
PROBE_SIZES = (224, 299, 256, 320, 416)
TAIL = math.inf


def _params_of(block: gluon.Block) -> list[gluon.Parameter]:
    return list(block.collect_params().values())


def _level(traced: zoo.Traced | None, size: int) -> float | None:
    """``log2(size / height)`` of the coarsest map a block returns; TAIL after global pooling."""
    if traced is None:
        return None
    maps = [shape for shape in traced.outputs if len(shape) == 4 and shape[2] * shape[3] > 1]
    if not maps:
        return TAIL
    # Unpadded convolutions shave pixels (Inception v3 reaches 5 px at 1/32 of 224 px, log2
    # 5.49) and padded strides round up: bias the rounding toward the finer level.
    return math.floor(math.log2(size / min(shape[2] for shape in maps)) + 0.3)


def _is_sequence(block: gluon.Block, kids: list, traced: dict, size: int) -> bool:
    """Whether ``block`` is a list of blocks to look into rather than one block.

    A container that only calls its children in turn is one when they compute at several
    levels (a ``features`` block, Xception71's ``block2``); so is a container the forward pass
    never calls as a whole (HRNet's branch lists, NASNet's groups of cells). Any other block is
    one unit, whatever happens inside it (a residual unit that downsamples midway).
    """
    if id(block) not in traced:
        return True
    if not isinstance(block, gluon.nn.HybridSequential | gluon.nn.Sequential):
        return False
    return len({_level(traced.get(id(kid)), size) for _, kid in kids}) > 1


def _units(body: list[tuple[str, gluon.Block]], traced: dict, size: int) -> list[tuple]:
    """``(path, block)`` of the blocks with weights that parts are made of, in call order."""
    units, seen = [], set()

    def visit(path: str, block: gluon.Block) -> None:
        if id(block) in seen or not _params_of(block):
            return
        seen.add(id(block))  # GoogLeNet registers its output twice
        kids = [(f"{path}.{name}", kid) for name, kid in block._children.items()]
        kids = [(p, kid) for p, kid in kids if _params_of(kid)]
        if kids and _is_sequence(block, kids, traced, size):
            for kid_path, kid in kids:
                visit(kid_path, kid)
        else:
            units.append((path, block))

    for path, block in body:
        visit(path, block)
    return units


def _trace(net: gluon.Block) -> tuple[dict, int] | None:
    for size in PROBE_SIZES:
        try:
            return zoo.trace_shapes(net, size), size
        except Exception:  # the zoo's own code may fail first (ResNeSt: ZeroDivisionError)
            continue
    return None


@dataclass
class Layout:
    """The named parts of a network, found from its block structure and its shapes.

    ``features`` is ``net.features`` when the network has one, else every child but the head.
    Each of ``stem``, ``stages[k]`` and ``tail`` lists ``(attribute path, block)``; ``levels[k]``
    is stage k's level (its maps are ``1 / 2**level`` of the input).
    """

    head: gluon.Block | None
    features: list[gluon.Block]
    head_path: str | None = None
    stem: list[tuple[str, gluon.Block]] = field(default_factory=list)
    stages: list[list[tuple[str, gluon.Block]]] = field(default_factory=list)
    levels: list[int] = field(default_factory=list)
    tail: list[tuple[str, gluon.Block]] = field(default_factory=list)

    def paths(self) -> dict[str, list[str]]:
        """Part name -> attribute paths of its blocks: stem, stage1.., tail, output."""
        parts = {"stem": self.stem}
        parts.update({f"stage{k}": stage for k, stage in enumerate(self.stages, 1)})
        parts["tail"] = self.tail
        found = {name: [path for path, _ in units] for name, units in parts.items() if units}
        if self.head is not None:
            found["output"] = [self.head_path]
        return found

    def parts(self, net: gluon.Block) -> dict[str, list[gluon.Block]]:
        """Part name -> blocks, in the order a user reads the network."""
        parts = {}
        if self.features:
            parts["features"] = self.features
        if self.head is not None:
            parts["output"] = [self.head]
        if self.stem:
            parts["stem"] = [block for _, block in self.stem]
        for k, stage in enumerate(self.stages, 1):
            parts[f"stage{k}"] = [block for _, block in stage]
        if self.tail:
            parts["tail"] = [block for _, block in self.tail]
        parts[ALL] = [net]
        return parts


def network_layout(net: gluon.Block) -> Layout:
    """Find the head, the features, the stem, the stages and the tail of ``net``."""
    try:
        split = split_head(net)
        head_path, head, body = split.head_path, split.head, split.body
    except UsageError:
        head_path, head, body = None, None, list(net._children.items())
    features = getattr(net, "features", None)
    if isinstance(features, gluon.Block):
        feature_blocks = [features]
    else:
        # Without a features block, "features" is the body (GoogLeNet registers its head twice;
        # NASNet nests it).
        feature_blocks = [block for _, block in body] if head is not None else []
    traced = _trace(net)
    if traced is None:
        return Layout(head, feature_blocks, head_path)
    shapes, size = traced
    level, by_level = 0, {}
    for path, block in _units(body, shapes, size):
        found = _level(shapes.get(id(block)), size)  # None: never called, stays where it is
        if found is not None:
            level = max(level, found)
        by_level.setdefault(level, []).append((path, block))
    levels = sorted(lv for lv in by_level if FIRST_STAGE_LEVEL <= lv < TAIL)
    if not levels:
        return Layout(head, feature_blocks, head_path)
    return Layout(
        head,
        feature_blocks,
        head_path,
        stem=[unit for lv, units in by_level.items() if lv < FIRST_STAGE_LEVEL for unit in units],
        stages=[by_level[lv] for lv in levels],
        levels=[int(lv) for lv in levels],
        tail=by_level.get(TAIL, []),
    )


def named_parts(net: gluon.Block) -> dict[str, list[gluon.Block]]:
    """Return ``{part name: blocks}``: ``features``, ``output``, ``stem``, ``stage1``.., ``all``.

    Only the parts this network has are listed: ``tail`` where something with weights follows
    global pooling (VGG), no ``stem`` for AlexNet (its first convolution has stride 4).
    """
    return network_layout(net).parts(net)


def stem_blocks(net: gluon.Block) -> list[gluon.Block]:
    """The ``stem`` part's blocks, in the order they run (ResNet v2: the input BatchNorm, the
    7x7 convolution, BatchNorm, ReLU); [] for a network without stages. The last one's output
    feeds ``stage1``. bfloat16 keeps these in float32, in training
    (:func:`gluon_ft.train.amp.prepare_network`) and in inference
    (:mod:`gluon_ft.deploy.inference`).
    """
    return [block for _, block in network_layout(net).stem]


def describe_parts(net: gluon.Block) -> str:
    """The part names of ``net`` in one line: ``features, output, stem, stage1..stage4, all``."""
    names = list(named_parts(net))
    stages = [n for n in names if n.startswith("stage")]
    if len(stages) > 2:
        names = [n for n in names if n not in stages[1:]]
        names[names.index(stages[0])] = f"{stages[0]}..{stages[-1]}"
    return ", ".join(names)


@dataclass(frozen=True)
class PartSummary:
    """One line of ``gluon-ft models NAME --parts``."""

    name: str
    scale: str  # "1/4": the part's maps against the input; "" for the tail and the head
    params: int
    blocks: list[str]  # attribute paths, numbered runs shortened: features.4..15

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def shorten_paths(paths: list[str]) -> list[str]:
    """``features.4, features.5, features.6`` -> ``features.4..6`` (numbered siblings in a row)."""
    out: list[str] = []
    run: tuple[str, int, int] | None = None  # parent, first, last
    for path in [*paths, ""]:
        match = re.fullmatch(r"(.*)\.(\d+)", path)
        if run and match and match[1] == run[0] and int(match[2]) > run[2]:
            run = (run[0], run[1], int(match[2]))
            continue
        if run:
            out.append(f"{run[0]}.{run[1]}" + (f"..{run[2]}" if run[2] != run[1] else ""))
            run = None
        if match:
            run = (match[1], int(match[2]), int(match[2]))
        elif path:
            out.append(path)
    return out


def summarize_parts(net: gluon.HybridBlock, image_size: int) -> list[PartSummary]:
    """The parts of ``net`` with their scale, parameter count (at ``image_size``) and blocks."""
    layout = network_layout(net)
    shapes, _ = zoo.infer_shapes(net, image_size)
    paths = layout.paths()
    levels = dict(zip([f"stage{k}" for k in range(1, len(layout.levels) + 1)], layout.levels))
    levels["stem"] = 1
    parts = layout.parts(net)
    rows = []
    for name, blocks in paths.items():
        params = {p.name for block in parts[name] for p in _params_of(block)}
        count = int(sum(np.prod(shapes[p]) for p in params if p in shapes))
        scale = f"1/{2 ** levels[name]}" if name in levels else ""
        rows.append(PartSummary(name, scale, count, shorten_paths(blocks)))
    return rows
