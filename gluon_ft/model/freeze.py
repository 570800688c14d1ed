"""Freezing by part or pattern, BatchNorm freezing, lr_mult policies and the parameter table.

The MXNet forum answer in named operations::

    freeze(net, "features")              # grad_req='null', and the BatchNorm layers frozen
    print(trainable_table(net))          # name, shape, grad_req, lr_mult, wd_mult, count
    set_lr_policy(net, layer_decay=0.5)  # stage k from the top learns 0.5**k as fast
    unfreeze(net, "stage4")              # gradual unfreezing, mid-run if need be

Every function takes the whole network (the block that was, or will be, hybridized) and works
before or after ``hybridize()``.

What "frozen" means for BatchNorm (GUIDE section 5): ``grad_req='null'`` alone keeps gamma
and beta fixed, but inside ``autograd.record()`` the layer still normalizes with the batch
statistics, and between trainable layers it still updates its running statistics. A frozen
BatchNorm here has all three fixed: its parameters, its running statistics, and a forward pass
that uses the running statistics (``use_global_stats``) in training too. ``bn="train"`` is
the opt-out (fastai's ``train_bn``): the BatchNorm layers of a frozen part keep training.
``bn="inference"`` goes the other way (Keras's advice for fine-tuning): every BatchNorm
normalizes with its running statistics, which stay fixed, in the parts that train too; the
gamma and beta of a trained part still learn.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field

import numpy as np
from mxnet import gluon

from gluon_ft.errors import UsageError
from gluon_ft.model.graft import walk_blocks
from gluon_ft.model.parts import ALL, describe_parts, named_parts, network_layout

BN_MODES = ("freeze", "train", "inference")
OUTPUT = "output"  # the new head's part
# BatchNorm remembers the use_global_stats it was built with here, so unfreezing restores it.
_BUILT_WITH = "_gluon_ft_built_with_global_stats"


# ----------------------------------------------------------------------------- structure


def is_batchnorm(block: gluon.Block) -> bool:
    """BatchNorm and its variants (SyncBatchNorm, BatchNormReLU, GluonCV's) by their kwargs."""
    kwargs = getattr(block, "_kwargs", None)
    return isinstance(kwargs, dict) and "use_global_stats" in kwargs


def _params_of(block: gluon.Block) -> list[gluon.Parameter]:
    return list(block.collect_params().values())


# ----------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """Parameters chosen by a part name or a regex, and the BatchNorm layers among them."""

    pattern: str
    params: list[gluon.Parameter]
    batchnorms: list[gluon.Block]


def _unique(items):
    seen, out = set(), []
    for item in items:
        if id(item) not in seen:
            seen.add(id(item))
            out.append(item)
    return out


def select(net: gluon.Block, pattern: str) -> Selection:
    """Resolve ``pattern`` to the parameters and BatchNorm layers it names.

    Parameters
    ----------
    net : Block
        The whole network.
    pattern : str
        A part name (see :func:`named_parts`), or a regular expression searched in each
        parameter's name (``resnetv20_stage1_conv0_weight``) and in its attribute path
        (``features.5.0.conv1.weight``). A BatchNorm layer is selected when any of its
        parameters is.

    Raises
    ------
    UsageError
        The pattern is neither a part nor a regex that matches a parameter; the message names
        the parts this network has.
    """
    parts = named_parts(net)
    if pattern in parts:
        blocks = parts[pattern]
        params = _unique(p for b in blocks for p in _params_of(b))
        batchnorms = _unique(blk for b in blocks for _, blk in walk_blocks(b) if is_batchnorm(blk))
        return Selection(pattern, params, batchnorms)
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise UsageError(
            f"{pattern!r} is not a part of this network ({describe_parts(net)}) nor a valid "
            f"regular expression ({err})."
        ) from None
    by_path = net._collect_params_with_prefix()
    params = _unique(p for path, p in by_path.items() if regex.search(p.name) or regex.search(path))
    if not params:
        kind = "part" if re.fullmatch(r"[A-Za-z_]\w*", pattern) else "pattern"
        example = next(iter(by_path.items()), ("", None))
        hint = f" (e.g. {example[1].name} or {example[0]})" if example[1] is not None else ""
        raise UsageError(
            f"Unknown {kind} {pattern!r}: it is not a part of this network and matches no "
            f"parameter name{hint}. Parts: {describe_parts(net)}; or pass a regular "
            "expression on parameter names."
        )
    chosen = {id(p) for p in params}
    batchnorms = [
        blk
        for _, blk in walk_blocks(net)
        if is_batchnorm(blk) and any(id(p) in chosen for p in _params_of(blk))
    ]
    return Selection(pattern, params, _unique(batchnorms))


# ----------------------------------------------------------------------------- freezing


@dataclass
class FreezeChange:
    """What a :func:`freeze` or :func:`unfreeze` call changed."""

    pattern: str
    params: list[str] = field(default_factory=list)  # names whose grad_req changed
    batchnorms: list[str] = field(default_factory=list)  # layers whose statistics mode changed

    def __bool__(self) -> bool:
        return bool(self.params or self.batchnorms)

    def __str__(self) -> str:
        return (
            f"{self.pattern}: {len(self.params)} parameter(s) changed grad_req, "
            f"{len(self.batchnorms)} BatchNorm layer(s) changed statistics mode"
        )


def _set_global_stats(bn: gluon.Block, value: bool | None) -> bool:
    """Set ``use_global_stats`` (None: as built); return whether it changed."""
    if not hasattr(bn, _BUILT_WITH):
        setattr(bn, _BUILT_WITH, bool(bn._kwargs["use_global_stats"]))
    target = getattr(bn, _BUILT_WITH) if value is None else value
    if bool(bn._kwargs["use_global_stats"]) == target:
        return False
    bn._kwargs["use_global_stats"] = target
    return True


def _forget_cached_graphs(net: gluon.Block) -> None:
    """Make every hybridized block rebuild its graph on the next call.

    ``use_global_stats`` is baked into the cached graph: without this, a BatchNorm frozen after
    ``hybridize()`` keeps normalizing with batch statistics. (``grad_req`` changes were
    measured to work without it; rebuilding anyway keeps one rule for every change.)
    """
    for _, block in walk_blocks(net):
        if isinstance(block, gluon.HybridBlock):
            block._clear_cached_op()


def _apply(net, selection: Selection, grad_req: str, global_stats: bool | None, bn: str):
    if bn not in BN_MODES:
        raise UsageError(f"bn must be one of {', '.join(BN_MODES)}, not {bn!r}.")
    change = FreezeChange(selection.pattern)
    params = selection.params
    if bn == "inference":
        global_stats = True  # trained or frozen, the running statistics normalize
    if bn == "train":
        # fastai's train_bn: BatchNorm layers stay fully trainable inside a frozen part.
        bn_params = {id(p) for b in selection.batchnorms for p in _params_of(b)}
        params = [p for p in params if id(p) not in bn_params]
    else:
        for layer in selection.batchnorms:
            if _set_global_stats(layer, global_stats):
                change.batchnorms.append(layer.name)
    for param in params:
        before = param.grad_req
        param.grad_req = grad_req  # non-differentiable ones (running stats) stay 'null'
        if param.grad_req != before:
            change.params.append(param.name)
    if change:
        _forget_cached_graphs(net)
    return change


def freeze(net: gluon.Block, pattern: str, bn: str = "freeze") -> FreezeChange:
    """Freeze the part or the parameters ``pattern`` names; return what changed.

    Frozen parameters get ``grad_req='null'``: the Trainer skips them (no update, no weight
    decay). With ``bn="freeze"`` (the default) the selected BatchNorm layers also normalize
    with their running statistics, which then stay fixed, in training as in prediction.

    Parameters
    ----------
    net : Block
        The whole network, hybridized or not.
    pattern : str
        A part (``features``, ``output``, ``stem``, ``stage1``.., ``tail``, ``all``; see
        :mod:`gluon_ft.model.parts`) or a regex on parameter names; see :func:`select`.
    bn : {"freeze", "train", "inference"}
        ``"train"`` leaves the BatchNorm layers of the selection trainable (fastai's
        ``train_bn``); ``"inference"`` freezes them as ``"freeze"`` does.

    Raises
    ------
    UsageError
        Unknown part, or a pattern that matches nothing.
    """
    return _apply(net, select(net, pattern), "null", True, bn)


def unfreeze(
    net: gluon.Block, pattern: str, grad_req: str = "write", bn: str = "freeze"
) -> FreezeChange:
    """Make the part or parameters ``pattern`` names trainable again; return what changed.

    BatchNorm layers go back to the statistics mode they were built with. ``grad_req`` is
    ``"add"`` under gradient accumulation. Parameters that cannot have a gradient (running
    statistics, a BatchNorm's fixed gamma) stay ``'null'``.
    """
    if grad_req not in ("write", "add"):
        raise UsageError(f"grad_req for trainable parameters is write or add, not {grad_req!r}.")
    return _apply(net, select(net, pattern), grad_req, None, bn)


def set_trainable_grad_req(net: gluon.Block, grad_req: str) -> int:
    """Set every trainable parameter's ``grad_req`` (``"add"`` to accumulate gradients).

    Frozen (``'null'``) parameters stay frozen. Returns the number of parameters changed.
    """
    changed = 0
    for param in net.collect_params().values():
        if param.grad_req not in ("null", grad_req):
            param.grad_req = grad_req
            changed += 1
    if changed:
        _forget_cached_graphs(net)
    return changed


def use_running_stats(net: gluon.Block) -> list[str]:
    """Make every BatchNorm normalize with its running statistics, in training too, and keep
    them fixed (``--bn inference``); its gamma and beta keep their ``grad_req``. Returns the
    layers changed."""
    changed = [
        b.name for _, b in walk_blocks(net) if is_batchnorm(b) and _set_global_stats(b, True)
    ]
    if changed:
        _forget_cached_graphs(net)
    return changed


def needs_input_grad(net: gluon.Block) -> bool:
    """Whether a training step must take the gradient of the input for every BatchNorm in
    training mode to update its running statistics.

    MXNet updates them in BatchNorm's backward pass, and skips that pass for a layer that
    neither trains parameters nor has any before it: ResNet v2's first layer, a BatchNorm
    without gamma and beta on the input, would keep the source's statistics for good (and
    the test would normalize the input with them while training normalized it by batch).
    Any BatchNorm normalizing by batch with every parameter frozen counts: what runs before
    it may be frozen too.
    """
    return any(
        is_batchnorm(block)
        and not block._kwargs["use_global_stats"]
        and all(p.grad_req == "null" for p in _params_of(block))
        for _, block in walk_blocks(net)
    )


def frozen_batchnorms(net: gluon.Block) -> list[str]:
    """Names of the BatchNorm layers that use their running statistics in training."""
    blocks = (b for _, b in walk_blocks(net))
    return [b.name for b in blocks if is_batchnorm(b) and b._kwargs["use_global_stats"]]


# ----------------------------------------------------------------------------- lr policies


def set_lr_policy(
    net: gluon.Block,
    head_lr_mult: float | None = None,
    layer_decay: float | None = None,
    spread: float | None = None,
) -> dict[str, float]:
    """Set ``lr_mult`` by part: the head multiplier and layer-wise decay.

    The Trainer's optimizer reads ``lr_mult`` from each Parameter at every step, so this works
    on hybridized networks and mid-run.

    Parameters
    ----------
    net : Block
        The whole network.
    head_lr_mult : float, optional
        ``lr_mult`` of the head (the book's 10).
    layer_decay : float, optional
        ``D``: counting from the top, where the head is 0, stage k gets ``D**k``. The last
        stage (with the tail after it, VGG's Dense layers) is 1, the stem is
        ``len(stages) + 1``.
    spread : float, optional
        ``S``: fastai's three rate groups, ``slice(lr / S, lr)``: the stem learns ``1 / S``
        as fast as the head, every stage ``1 / sqrt(S)`` (the geometric mean), the tail 1.
        Not with ``layer_decay``.

    Returns
    -------
    dict
        Part name -> the multiplier it now has, for the parts this call set.

    Raises
    ------
    UsageError
        Layer-wise decay on a network without stages, or a head multiplier without a head.
    """
    layout = network_layout(net)
    groups: list[tuple[str, list[gluon.Block], float]] = []
    if head_lr_mult is not None:
        if layout.head is None:
            raise UsageError(f"{type(net).__name__} has no output layer for a head lr_mult.")
        groups.append(("output", [layout.head], float(head_lr_mult)))
    if layer_decay is not None and spread is not None:
        raise UsageError("--lr-spread and --layer-lr-decay each set the body's rates: pass one.")
    if layer_decay is not None:
        groups += _decay_groups(net, layout, layer_decay)
    if spread is not None:
        groups += _spread_groups(net, layout, spread)
    applied = {}
    for name, blocks, mult in groups:
        for block in blocks:
            block.collect_params().setattr("lr_mult", mult)
        applied[name] = mult
    return applied


def _require_stages(net, layout, flag: str) -> None:
    if not layout.stages:
        raise UsageError(
            f"{flag} needs a network built from stages (like a ResNet); "
            f"{type(net).__name__} has none. Parts: {describe_parts(net)}."
        )


def _decay_groups(net, layout, decay: float) -> list[tuple[str, list, float]]:
    """Stage k from the top at ``decay**k``: the tail as the last stage, the stem slowest."""
    _require_stages(net, layout, "--layer-lr-decay")
    n, parts = len(layout.stages), layout.parts(net)
    ranks = {"tail": 1, **{f"stage{k}": n + 1 - k for k in range(n, 0, -1)}, "stem": n + 1}
    return [(p, parts[p], decay**k) for p, k in ranks.items() if p in parts]


def _spread_groups(net, layout, spread: float) -> list[tuple[str, list, float]]:
    """The stem at ``1 / spread``, the stages at ``1 / sqrt(spread)``, the tail at 1."""
    _require_stages(net, layout, "--lr-spread")
    parts = layout.parts(net)
    mults = {"stem": 1.0 / spread, "tail": 1.0}
    mults.update({f"stage{k}": spread**-0.5 for k in range(1, len(layout.stages) + 1)})
    return [(p, parts[p], m) for p, m in mults.items() if p in parts]


# ----------------------------------------------------------------------------- the table


@dataclass
class ParamRow:
    """One parameter: what the forum answer prints from ``collect_params()``, and more."""

    name: str
    shape: tuple
    grad_req: str
    lr_mult: float
    wd_mult: float
    count: int | None  # None while the shape is deferred

    @property
    def trainable(self) -> bool:
        return self.grad_req != "null"


def _count(shape) -> int | None:
    if not shape or any(d <= 0 for d in shape):
        return None
    return int(np.prod(shape))


def _human(n: int) -> str:
    return f"{n:,}"


@dataclass
class ParamTable:
    """The trainable-parameter table: one row per parameter, then totals.

    ``str()`` gives plain text for terminals; :meth:`to_markdown` and :meth:`to_html` (also
    Jupyter's rich display) give the same table for notebooks, without pandas.
    """

    rows: list[ParamRow]
    batchnorms: int
    frozen_batchnorms: int

    COLUMNS = ("name", "shape", "grad_req", "lr_mult", "wd_mult", "count")

    def _total(self, trainable: bool) -> tuple[int, int]:
        rows = [r for r in self.rows if r.trainable == trainable]
        return sum(r.count or 0 for r in rows), len(rows)

    @property
    def trainable_count(self) -> int:
        """Number of trainable scalars."""
        return self._total(True)[0]

    @property
    def frozen_count(self) -> int:
        """Number of frozen scalars (running statistics included)."""
        return self._total(False)[0]

    def totals(self) -> list[str]:
        """The closing lines: trainable and frozen totals, and the BatchNorm mode."""
        (t_count, t_rows), (f_count, f_rows) = self._total(True), self._total(False)
        lines = [
            f"trainable: {_human(t_count)} in {t_rows} parameter(s)",
            f"frozen: {_human(f_count)} in {f_rows} parameter(s)",
        ]
        if self.batchnorms:
            lines.append(
                f"BatchNorm layers on running statistics in training: "
                f"{self.frozen_batchnorms} of {self.batchnorms}"
            )
        return lines

    def summary(self) -> str:
        """One line: the totals."""
        return "; ".join(self.totals())

    def _cells(self) -> list[tuple[str, ...]]:
        return [
            (
                r.name,
                "x".join(str(d) for d in r.shape) if r.shape else "?",
                r.grad_req,
                f"{r.lr_mult:g}",
                f"{r.wd_mult:g}",
                _human(r.count) if r.count is not None else "?",
            )
            for r in self.rows
        ]

    def to_text(self) -> str:
        """Aligned plain text."""
        cells = self._cells()
        widths = [max(len(c[i]) for c in [self.COLUMNS, *cells]) for i in range(6)]
        right = {3, 4, 5}

        def line(values):
            return "  ".join(
                v.rjust(w) if i in right else v.ljust(w)
                for i, (v, w) in enumerate(zip(values, widths))
            ).rstrip()

        out = [line(self.COLUMNS), line("-" * w for w in widths)]
        out += [line(c) for c in cells]
        return "\n".join(out + [""] + self.totals())

    def to_markdown(self) -> str:
        """A GitHub-flavoured markdown table, then the totals."""
        out = ["| " + " | ".join(self.COLUMNS) + " |", "|" + "---|" * 3 + "---:|" * 3]
        for row in self._cells():
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        return "\n".join(out + [""] + [f"- {t}" for t in self.totals()])

    def to_html(self) -> str:
        """An HTML table, then the totals."""
        head = "".join(f"<th>{c}</th>" for c in self.COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
            for row in self._cells()
        )
        totals = "".join(f"<li>{html.escape(t)}</li>" for t in self.totals())
        table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        return f"{table}<ul>{totals}</ul>"

    __str__ = to_text
    _repr_html_ = to_html
    _repr_markdown_ = to_markdown


def trainable_table(net: gluon.Block) -> ParamTable:
    """Build the trainable-parameter table of ``net`` (one row per parameter)."""
    rows = [
        ParamRow(p.name, tuple(p.shape or ()), p.grad_req, p.lr_mult, p.wd_mult, _count(p.shape))
        for p in net.collect_params().values()
    ]
    layers = [b for _, b in walk_blocks(net) if is_batchnorm(b)]
    frozen = sum(bool(b._kwargs["use_global_stats"]) for b in layers)
    return ParamTable(rows, len(layers), frozen)


def log_table(path, net: gluon.Block, heading: str) -> ParamTable:
    """Append ``net``'s table under ``heading`` to the text file ``path``; return the table."""
    table = trainable_table(net)
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"## {heading}\n\n{table}\n\n")
    return table


# ----------------------------------------------------------------------------- schedules


def parse_unfreeze_schedule(text: str) -> list[tuple[int, str]]:
    """Parse ``"0:output,2:stage4,4:all"`` into ``[(0, "output"), (2, "stage4"), (4, "all")]``.

    Epochs count from 0 (the first epoch). The parts are checked against the network later,
    by :func:`select`.
    """
    entries = []
    for item in text.split(","):
        epoch, sep, part = item.strip().partition(":")
        try:
            value = int(epoch)
        except ValueError:
            value = -1
        if not sep or value < 0 or not part.strip():
            raise UsageError(
                f"--unfreeze-at {text!r}: each entry is EPOCH:PART with EPOCH >= 0 (the first "
                'epoch is 0), e.g. "0:output,2:stage4,4:all"; got {item.strip()!r}.'
            )
        entries.append((value, part.strip()))
    return sorted(entries, key=lambda e: e[0])


@dataclass
class FreezePlan:
    """What a training run freezes, how fast each part learns, and when parts unfreeze.

    :meth:`setup` applies it once to a fresh network; :meth:`at_epoch` before every epoch
    (idempotent, so a resumed run reaches the same state by calling it for its first epoch).

    ``head_epochs`` E > 0 trains the new head alone for the first E epochs, on a body frozen
    with its BatchNorm (so its features can be cached), then opens the network as ``freeze``
    says. With ``bn="train"`` the body's BatchNorm layers train in those epochs (batch
    statistics, running statistics re-estimated on the target, gamma and beta learning), as
    fastai's ``fine_tune``; the features then change and are not cached.
    """

    freeze: str = "none"
    bn: str = "freeze"
    layer_lr_decay: float | None = None
    unfreeze_at: str | None = None
    accumulate: int = 1
    head_epochs: int = 0
    lr_spread: float | None = None
    _body_open: bool = field(default=False, repr=False, compare=False)

    @property
    def schedule(self) -> list[tuple[int, str]]:
        return parse_unfreeze_schedule(self.unfreeze_at) if self.unfreeze_at else []

    @property
    def live_head(self) -> bool:
        """Head epochs whose BatchNorm trains (``--bn train``): run on images, not cached
        features, since their statistics and gamma and beta move."""
        return bool(self.head_epochs) and self.bn == "train"

    @property
    def grad_req(self) -> str:
        """``'add'`` under gradient accumulation, else ``'write'``."""
        return "add" if self.accumulate > 1 else "write"

    def validate(self, epochs: int) -> None:
        """Check what needs no network; raise :class:`UsageError`."""
        if self.bn not in BN_MODES:
            raise UsageError(f"--bn must be one of {', '.join(BN_MODES)}, not {self.bn!r}.")
        if self.layer_lr_decay is not None and not (
            math.isfinite(self.layer_lr_decay) and 0 < self.layer_lr_decay <= 1
        ):
            raise UsageError("--layer-lr-decay must be in (0, 1].")
        if self.lr_spread is not None and not (
            math.isfinite(self.lr_spread) and self.lr_spread >= 1
        ):
            raise UsageError("--lr-spread must be at least 1 (1: one rate for the body).")
        if self.lr_spread is not None and self.layer_lr_decay is not None:
            raise UsageError(
                "--lr-spread and --layer-lr-decay each set the body's rates: pass one."
            )
        if self.accumulate < 1:
            raise UsageError("--accumulate must be at least 1.")
        if self.head_epochs and self.unfreeze_at:
            raise UsageError(
                '--head-epochs E is the unfreezing schedule "0:output,E:all" (with the head\'s '
                "features cached); pass it or --unfreeze-at, not both."
            )
        schedule = self.schedule
        if schedule:
            self._validate_schedule(schedule, epochs)

    def _validate_schedule(self, schedule: list[tuple[int, str]], epochs: int) -> None:
        if self.freeze != "none":
            raise UsageError(
                "--unfreeze-at starts from a fully frozen network and unfreezes parts by "
                "epoch; it replaces --freeze, so pass only one of them."
            )
        if schedule[0][0] != 0:
            raise UsageError(
                f"--unfreeze-at {self.unfreeze_at!r} unfreezes nothing at epoch 0, so the "
                'first epoch would train nothing; start with e.g. "0:output".'
            )
        late = [f"{e}:{p}" for e, p in schedule if e >= epochs]
        if late:
            raise UsageError(
                f"--unfreeze-at entries {', '.join(late)} come after the last epoch "
                f"({epochs - 1}, counting from 0)."
            )

    def setup(self, net: gluon.Block) -> list[FreezeChange]:
        """Freeze, set the lr policy and the gradient mode: the state for the first epoch.

        Every scheduled part is checked here, so a typo fails before training starts.
        """
        changes = []
        if self.schedule:
            for _, part in self.schedule:
                select(net, part)
            changes.append(freeze(net, ALL, self.bn))
        elif self.head_epochs:
            if self.freeze != "none":
                select(net, self.freeze)
            # BatchNorm frozen too, for cacheable features; with --bn train it trains in the
            # head epochs (fastai's train_bn), which then run live on the images.
            changes.append(freeze(net, ALL, "train" if self.live_head else "freeze"))
            changes.append(unfreeze(net, OUTPUT, self.grad_req))
        elif self.freeze != "none":
            changes.append(freeze(net, self.freeze, self.bn))
        if self.bn == "inference":
            use_running_stats(net)
        if self.layer_lr_decay is not None or self.lr_spread is not None:
            set_lr_policy(net, layer_decay=self.layer_lr_decay, spread=self.lr_spread)
        set_trainable_grad_req(net, self.grad_req)
        return changes + self.at_epoch(net, 0)

    def at_epoch(self, net: gluon.Block, epoch: int) -> list[FreezeChange]:
        """Unfreeze every part scheduled at or before ``epoch``; return the changes made."""
        if self.head_epochs:
            return self._open_body(net) if epoch >= self.head_epochs else []
        changes = [
            unfreeze(net, part, self.grad_req, self.bn)
            for when, part in self.schedule
            if when <= epoch
        ]
        return [c for c in changes if c]

    def _open_body(self, net: gluon.Block) -> list[FreezeChange]:
        """The end of the head epochs: everything trains but ``freeze``'s part, once."""
        if self._body_open:
            return []
        self._body_open = True
        bn = "inference" if self.bn == "inference" else "freeze"  # as built, or fixed
        changes = [unfreeze(net, ALL, self.grad_req, bn)]
        if self.freeze != "none":
            changes.append(freeze(net, self.freeze, self.bn))
        return [c for c in changes if c]

    def record(self, net: gluon.Block) -> dict:
        """What is frozen now, for ``config.json``."""
        table = trainable_table(net)
        return {
            "freeze": self.freeze,
            "bn": self.bn,
            "layer_lr_decay": self.layer_lr_decay,
            "lr_spread": self.lr_spread,
            "unfreeze_at": [f"{e}:{p}" for e, p in self.schedule],
            "accumulate": self.accumulate,
            "trainable_params": table.trainable_count,
            "frozen_params": table.frozen_count,
            "frozen": [
                p.name
                for p in net.collect_params().values()
                if p.grad_req == "null" and p._differentiable
            ],
            "batchnorm_on_running_stats": frozen_batchnorms(net),
        }
