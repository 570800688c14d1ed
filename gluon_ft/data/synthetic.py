"""The built-in offline transfer task behind ``make demo``.

Every image shows one textured shape on a cluttered background. A class is a combination
``<texture>-<shape>`` (``striped-star``, ``dotted-circle``, ...). The SOURCE dataset has many
such combinations with plenty of images; the TARGET dataset has a few *new* combinations with
few training images. Its first four classes form a 2x2 block (two shapes x two textures), so a
target class is told apart only by shape and texture together, both of which the source
teaches. Colors, position, size, rotation, texture scale and phase, background gradient,
clutter strokes and pixel noise vary at random, so a network trained from scratch on a few
target images has to learn those invariances too, while a network pretrained on the source
already has them.

Measured on 2 CPU cores with the default spec (32 px; model-zoo ``resnet18_v2`` pretrained on
the source for 12 epochs, about 105 s; 10 epochs of batch 16 on the target): fine-tuned 0.64-0.95
test accuracy, frozen features 0.58-0.98, training from scratch 0.27-0.39 (chance 0.25), over
three seeds. Textures and shapes must stay large (a period of a fifth to a third of the image,
shapes two thirds of it): with finer textures the source features did not separate striped
from dotted and the transfer failed.

Generation uses only ``numpy.random.RandomState`` and PIL, so a seed gives byte-identical PNG
files. :func:`generate_task` builds the task in a temporary sibling directory, writes
``task.json`` last and renames the directory into place; a later call with the same
parameters reuses it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gluon_ft.errors import UsageError

# Bump whenever the rendering changes, so cached tasks are regenerated.
TASK_VERSION = "gluon-ft-synthetic/2"
TASK_FILE = "task.json"
SPLITS = ("train", "test")

SHAPES = ("circle", "square", "triangle", "cross", "star", "ring", "crescent", "arrow")
TEXTURES = ("solid", "striped", "dotted", "checkered", "speckled")

# Held out of the source, in the order target classes are taken. The first four are the 2x2
# block {star, circle} x {striped, dotted}; the first nine the 3x3 block with cross/checkered.
TARGET_COMBOS = (
    ("striped", "star"),
    ("dotted", "circle"),
    ("dotted", "star"),
    ("striped", "circle"),
    ("checkered", "cross"),
    ("striped", "cross"),
    ("checkered", "star"),
    ("checkered", "circle"),
    ("dotted", "cross"),
)

# Rendering is done at this multiple of the output size, then box-filtered down (antialiasing).
SUPERSAMPLE = 2


@dataclass(frozen=True)
class TaskSpec:
    """Every size knob of the synthetic transfer task.

    Parameters
    ----------
    seed : int
        Seed of all randomness; the same spec gives byte-identical files.
    image_size : int
        Width and height of every image, in pixels.
    n_source_classes : int
        Number of source classes (at most ``len(SHAPES) * len(TEXTURES) - len(TARGET_COMBOS)``).
    source_train_per_class, source_test_per_class : int
        Images per source class in each split.
    n_target_classes : int
        Number of target classes (2 to ``len(TARGET_COMBOS)``), none of them a source class.
    target_train_per_class, target_test_per_class : int
        Images per target class in each split.
    """

    seed: int = 0
    image_size: int = 32
    n_source_classes: int = 30
    source_train_per_class: int = 200
    source_test_per_class: int = 30
    n_target_classes: int = 4
    target_train_per_class: int = 20
    target_test_per_class: int = 50

    def __post_init__(self) -> None:
        max_source = len(SHAPES) * len(TEXTURES) - len(TARGET_COMBOS)
        if not 16 <= self.image_size <= 512:
            raise UsageError(f"image_size must be between 16 and 512, got {self.image_size}.")
        if not 2 <= self.n_source_classes <= max_source:
            raise UsageError(
                f"n_source_classes must be between 2 and {max_source}, "
                f"got {self.n_source_classes}."
            )
        if not 2 <= self.n_target_classes <= len(TARGET_COMBOS):
            raise UsageError(
                f"n_target_classes must be between 2 and {len(TARGET_COMBOS)}, "
                f"got {self.n_target_classes}."
            )
        counts = {
            "source_train_per_class": self.source_train_per_class,
            "source_test_per_class": self.source_test_per_class,
            "target_train_per_class": self.target_train_per_class,
            "target_test_per_class": self.target_test_per_class,
        }
        for name, value in counts.items():
            if value < 1:
                raise UsageError(f"{name} must be at least 1, got {value}.")


DEFAULT_SPEC = TaskSpec()
SMALL_SPEC = TaskSpec(
    image_size=32,
    n_source_classes=5,
    source_train_per_class=8,
    source_test_per_class=3,
    n_target_classes=4,
    target_train_per_class=4,
    target_test_per_class=3,
)


def class_name(texture: str, shape: str) -> str:
    """Return the folder name of a class, e.g. ``striped-star``."""
    return f"{texture}-{shape}"


def target_classes(spec: TaskSpec) -> list[str]:
    """Return the target class names of ``spec``, in generation order."""
    return [class_name(*combo) for combo in TARGET_COMBOS[: spec.n_target_classes]]


def source_classes(spec: TaskSpec) -> list[str]:
    """Return the source class names of ``spec``, in generation order.

    All target combinations are held out whatever ``n_target_classes`` is, so the source does
    not depend on it. The order walks the shape x texture table diagonally, so any prefix
    covers every shape and every texture as evenly as possible.
    """
    held_out = set(TARGET_COMBOS)
    combos = [
        (TEXTURES[(s + d) % len(TEXTURES)], SHAPES[s])
        for d in range(len(TEXTURES))
        for s in range(len(SHAPES))
    ]
    kept = [combo for combo in combos if combo not in held_out]
    return [class_name(*combo) for combo in kept[: spec.n_source_classes]]


# --- drawing -------------------------------------------------------------------------------


def _polygon(cx: float, cy: float, radius: float, angle: float, unit: list) -> list:
    """Scale, rotate and translate unit-circle polygon vertices into canvas coordinates."""
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in unit]


def _regular(n: int, inner: float | None = None) -> list:
    """Vertices of a regular n-gon (or an n-pointed star with ``inner`` radius) of radius 1."""
    if inner is None:
        return [
            (
                math.cos(2 * math.pi * k / n - math.pi / 2),
                math.sin(2 * math.pi * k / n - math.pi / 2),
            )
            for k in range(n)
        ]
    points = []
    for k in range(2 * n):
        r = 1.0 if k % 2 == 0 else inner
        a = math.pi * k / n - math.pi / 2
        points.append((r * math.cos(a), r * math.sin(a)))
    return points


_CROSS = [
    (-0.33, -1),
    (0.33, -1),
    (0.33, -0.33),
    (1, -0.33),
    (1, 0.33),
    (0.33, 0.33),
    (0.33, 1),
    (-0.33, 1),
    (-0.33, 0.33),
    (-1, 0.33),
    (-1, -0.33),
    (-0.33, -0.33),
]
_UNIT_POLYGONS = {
    "square": [(x * 0.8, y * 0.8) for x, y in _regular(4)],
    "triangle": [(x, y + 0.2) for x, y in _regular(3)],
    "arrow": [
        (-0.15, -1),
        (0.85, 0),
        (-0.15, 1),
        (-0.15, 0.4),
        (-0.9, 0.4),
        (-0.9, -0.4),
        (-0.15, -0.4),
    ],
    "star": _regular(5, inner=0.42),
    "cross": _CROSS,
}


def _shape_mask(
    shape: str, n: int, cx: float, cy: float, radius: float, angle: float
) -> Image.Image:
    """Return an ``n x n`` mask image: 255 inside the shape drawn at the given pose, else 0."""
    mask = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(mask)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        hole = 0.55 * radius
        draw.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=0)
    elif shape == "crescent":
        draw.ellipse(box, fill=255)
        dx, dy = 0.5 * radius * math.cos(angle), 0.5 * radius * math.sin(angle)
        bite = 0.85 * radius
        draw.ellipse((cx + dx - bite, cy + dy - bite, cx + dx + bite, cy + dy + bite), fill=0)
    else:
        draw.polygon(_polygon(cx, cy, radius, angle, _UNIT_POLYGONS[shape]), fill=255)
    return mask


@functools.lru_cache(maxsize=4)
def _pixel_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates of an ``n x n`` canvas (read-only, shared between calls)."""
    y, x = np.meshgrid(
        np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32), indexing="ij"
    )
    y.flags.writeable = x.flags.writeable = False
    return y, x


def _texture(texture: str, n: int, rng: np.random.RandomState) -> np.ndarray:
    """Return an ``n x n`` uint8 pattern: 255 picks the first color, 0 the second.

    The period is a fifth to a third of the image, with a random orientation and phase: coarse
    enough to survive the stride-4 stem of a model-zoo ResNet at 32 px.
    """
    period = rng.uniform(0.2, 0.3) * n
    angle = rng.uniform(0, math.pi)
    phase_u, phase_v = rng.uniform(0, period, size=2)
    y, x = _pixel_grid(n)
    u = np.mod(x * math.cos(angle) + y * math.sin(angle) + phase_u, period)
    v = np.mod(-x * math.sin(angle) + y * math.cos(angle) + phase_v, period)
    if texture == "solid":
        first = np.ones((n, n), bool)
    elif texture == "striped":
        first = u < period / 2
    elif texture == "dotted":
        first = (u - period / 2) ** 2 + (v - period / 2) ** 2 > (0.3 * period) ** 2
    elif texture == "checkered":
        first = (u < period / 2) != (v < period / 2)
    elif texture == "speckled":
        cell = max(1, round(0.05 * n))
        cells = rng.uniform(size=(-(-n // cell),) * 2) < 0.5
        first = cells.repeat(cell, axis=0).repeat(cell, axis=1)[:n, :n]
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return first.astype(np.uint8) * np.uint8(255)


Color = tuple[int, int, int]


def _random_color(rng: np.random.RandomState) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def _contrasting_pair(rng: np.random.RandomState) -> tuple[Color, Color]:
    """Two colors whose brightness differs enough for a texture to be visible."""
    first = _random_color(rng)
    second = _random_color(rng)
    gap = first.mean() - second.mean()
    if abs(gap) < 100:
        shift = (100 - abs(gap)) * (1 if gap >= 0 else -1)
        first = np.clip(first + shift / 2, 0, 255)
        second = np.clip(second - shift / 2, 0, 255)
    return _as_color(first), _as_color(second)


def _as_color(values: np.ndarray) -> Color:
    red, green, blue = (int(v) for v in values)
    return red, green, blue


def _background(n: int, rng: np.random.RandomState) -> Image.Image:
    """A two-color linear gradient in a random direction, with random clutter strokes."""
    start, end = _as_color(_random_color(rng)), _as_color(_random_color(rng))
    angle = rng.uniform(0, 2 * math.pi)
    y, x = _pixel_grid(n)
    ramp = np.clip(((x - n / 2) * math.cos(angle) + (y - n / 2) * math.sin(angle)) / n + 0.5, 0, 1)
    ramp_mask = Image.fromarray((ramp * 255).astype(np.uint8), "L")
    canvas = Image.composite(
        Image.new("RGB", (n, n), end), Image.new("RGB", (n, n), start), ramp_mask
    )
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.randint(0, 3)):
        x0, y0, x1, y1 = rng.uniform(0, n, size=4)
        draw.line((x0, y0, x1, y1), fill=_as_color(rng.randint(0, 256, size=3)), width=SUPERSAMPLE)
    return canvas


def render_image(texture: str, shape: str, size: int, rng: np.random.RandomState) -> Image.Image:
    """Draw one ``size x size`` RGB image of a ``texture`` ``shape`` with random nuisances.

    Parameters
    ----------
    texture : str
        One of :data:`TEXTURES`.
    shape : str
        One of :data:`SHAPES`.
    size : int
        Output width and height in pixels.
    rng : numpy.random.RandomState
        The only source of randomness.

    Returns
    -------
    PIL.Image.Image
        An RGB image.
    """
    n = size * SUPERSAMPLE
    background = _background(n, rng)
    radius = rng.uniform(0.33, 0.47) * n
    margin = 0.8 * radius
    cx, cy = rng.uniform(margin, n - margin, size=2)
    mask = _shape_mask(shape, n, cx, cy, radius, rng.uniform(0, 2 * math.pi))
    pattern = Image.fromarray(_texture(texture, n, rng))
    first, second = _contrasting_pair(rng)
    foreground = Image.composite(
        Image.new("RGB", (n, n), first), Image.new("RGB", (n, n), second), pattern
    )
    canvas = Image.composite(foreground, background, mask)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    noisy = np.asarray(small, np.float32) + rng.normal(0, rng.uniform(2, 6), (size, size, 3))
    return Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8), "RGB")


# --- the task on disk -------------------------------------------------------------------


def _write_dataset(
    folder: Path, classes: list[str], counts: dict[str, int], seed: int, stream: int, size: int
) -> None:
    """Write ``folder/<split>/<class>/<index>.png`` for every split and class.

    Each (dataset, split, class) draws from its own RandomState, so changing one count does
    not change the images of other classes or splits.
    """
    for split_id, split in enumerate(SPLITS):
        for class_id, name in enumerate(classes):
            texture, shape = name.split("-")
            rng = np.random.RandomState([seed, stream, split_id, class_id])
            class_dir = folder / split / name
            class_dir.mkdir(parents=True)
            for index in range(counts[split]):
                image = render_image(texture, shape, size, rng)
                # Fixed options and no metadata: the bytes depend on the pixels only.
                image.save(class_dir / f"{index:05d}.png", format="PNG", compress_level=1)


def _expected_counts(spec: TaskSpec) -> dict[str, dict[str, int]]:
    return {
        "source": {"train": spec.source_train_per_class, "test": spec.source_test_per_class},
        "target": {"train": spec.target_train_per_class, "test": spec.target_test_per_class},
    }


def _manifest(spec: TaskSpec) -> dict:
    return {
        "version": TASK_VERSION,
        "spec": asdict(spec),
        "classes": {"source": source_classes(spec), "target": target_classes(spec)},
        "images_per_class": _expected_counts(spec),
    }


def _is_complete(root: Path, manifest: dict) -> bool:
    """True if ``root`` holds a finished task with exactly this manifest and file counts."""
    try:
        if json.loads((root / TASK_FILE).read_text()) != manifest:
            return False
        for dataset, classes in manifest["classes"].items():
            for split, count in manifest["images_per_class"][dataset].items():
                split_dir = root / dataset / split
                if sorted(p.name for p in split_dir.iterdir()) != sorted(classes):
                    return False
                for name in classes:
                    if sum(1 for p in (split_dir / name).iterdir() if p.suffix == ".png") != count:
                        return False
    except (OSError, ValueError):
        return False
    return True


def _remove_dead_partials(root: Path) -> None:
    """Delete temporary directories left by generations whose process no longer runs."""
    for path in root.parent.glob(f".{root.name}.partial-*"):
        try:
            pid = int(path.name.rsplit(".partial-", 1)[1].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def _looks_like_task(root: Path) -> bool:
    """True if ``root`` may be replaced: empty, or made of our task files only."""
    entries = {p.name for p in root.iterdir()}
    return entries <= {"source", "target", TASK_FILE}


def _move_into_place(partial: Path, root: Path, manifest: dict) -> None:
    """Rename the finished ``partial`` directory to ``root``, replacing an older task."""
    if _is_complete(root, manifest):
        return  # another process finished the same task meanwhile; its files are identical
    if root.exists():
        # os.rename cannot replace a non-empty directory: move the old task aside first.
        stale = partial.with_name(partial.name + "-stale")
        root.rename(stale)
        partial.rename(root)
        shutil.rmtree(stale)
    else:
        partial.rename(root)


def generate_task(root: str | Path, spec: TaskSpec = DEFAULT_SPEC) -> dict:
    """Generate the synthetic transfer task under ``root``, or reuse it if already there.

    ``root`` receives ``source/{train,test}/<class>/*.png``, ``target/{train,test}/<class>/*.png``
    and ``task.json``. The task is built in a temporary sibling directory and renamed into
    place after ``task.json`` is written, so an interrupted run never leaves a task that
    looks complete. An existing task with other parameters is replaced.

    Parameters
    ----------
    root : str or pathlib.Path
        The task directory.
    spec : TaskSpec, optional
        Sizes and seed; :data:`DEFAULT_SPEC` by default.

    Returns
    -------
    dict
        ``{"source": Path, "target": Path, "spec": dict, "reused": bool,
        "classes": {"source": [...], "target": [...]}}``.

    Raises
    ------
    UsageError
        If ``root`` exists and holds files that are not a synthetic task.
    """
    root = Path(root).absolute()
    manifest = _manifest(spec)
    result = {
        "source": root / "source",
        "target": root / "target",
        "spec": asdict(spec),
        "classes": manifest["classes"],
    }
    if _is_complete(root, manifest):
        return {**result, "reused": True}
    if root.exists() and not (root.is_dir() and _looks_like_task(root)):
        raise UsageError(
            f"{root} exists and is not a synthetic task directory; choose an empty or new "
            "directory for the demo task."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(root)
    partial = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-{os.getpid()}-", dir=root.parent))
    try:
        for stream, dataset in enumerate(("source", "target")):
            _write_dataset(
                partial / dataset,
                manifest["classes"][dataset],
                manifest["images_per_class"][dataset],
                spec.seed,
                stream,
                spec.image_size,
            )
        (partial / TASK_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(partial, root, manifest)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return {**result, "reused": False}
