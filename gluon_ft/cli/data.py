"""``check-data`` and ``pack``: a dataset before training."""

from __future__ import annotations

import argparse
import sys

from gluon_ft.cli.common import Command, positive_int


def add_check_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "dir",
        metavar="DIR",
        help="dataset folder: DIR/<class>/*, or DIR/train/<class>/* and test/. Exit code 0 when "
        "training accepts the folder, warnings included (unreadable files, which training "
        "skips; small images; imbalance); 2 when training would refuse it",
    )
    p.add_argument(
        "--image-size", type=positive_int, default=224, help="the training crop (default 224)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _run_check_data(args: argparse.Namespace) -> int:
    import json

    from gluon_ft.data.folders import check_dataset

    report = check_dataset(args.dir, args.image_size)
    print(json.dumps(report, indent=2) if args.json else _format_check_report(report))
    for line in imbalance_warnings(report) if args.json else []:
        print(line, file=sys.stderr)
    # Unreadable files are warnings: training skips them (--strict refuses them). Exit 2 is
    # for a folder training refuses outright.
    return 2 if report["problems"] else 0


def _format_check_report(report: dict, shown: int = 20) -> str:
    lines = [f"{report['root']} (crop {report['crop']} px)"]
    if report["splits"]:
        lines.append(
            f"  {'split':<6} {'class':<24} {'images':>7} {'unreadable':>11} {'small':>6}"
            f" {'ignored':>8} {'skipped':>8}"
        )
    unreadable, small, ignored, skipped = [], [], [], []
    for split, classes in report["splits"].items():
        for name, counts in classes.items():
            lines.append(
                f"  {split:<6} {name:<24} {counts['images']:>7} "
                f"{len(counts['unreadable']):>11} {len(counts['small']):>6}"
                f" {len(counts['ignored']):>8} {len(counts['skipped']):>8}"
            )
            unreadable += counts["unreadable"]
            small += [f"{s['path']}: {s['size'][0]}x{s['size'][1]}" for s in counts["small"]]
            ignored += counts["ignored"]
            skipped += counts["skipped"]
    for beside in report["beside_classes"].values():
        ignored += beside["ignored"]
        skipped += [f"{path} (not in a class folder)" for path in beside["skipped"]]
    if unreadable:
        lines.append(f"unreadable ({len(unreadable)}; training skips them, --strict refuses):")
        lines += [f"  {bad['path']}: {bad['reason']}" for bad in unreadable]
    crop = report["crop"]
    lines += _listing(f"smaller than the {crop}-px crop ({len(small)}; upscaled)", small, shown)
    lines += _listing(f"ignored ({len(ignored)} hidden names, never read)", ignored, shown)
    lines += _listing(
        f"skipped ({len(skipped)} files of no format Pillow decodes, or beside the classes)",
        skipped,
        shown,
    )
    copies = [" = ".join(group) for group in report["duplicates"]]
    lines += _listing(
        f"byte-identical files ({len(copies)} groups; a split keeps each group in one part, "
        "folders you split yourself are not moved)",
        copies,
        shown,
    )
    lines += [f"problem: {problem}" for problem in report["problems"]]
    lines += imbalance_warnings(report)
    return "\n".join(lines)


def _listing(title: str, entries: list[str], shown: int) -> list[str]:
    """``title:`` and the first ``shown`` entries, indented; nothing when there are none."""
    if not entries:
        return []
    lines = [f"{title}:"] + [f"  {entry}" for entry in entries[:shown]]
    if len(entries) > shown:
        lines.append(f"  ... and {len(entries) - shown} more (--json lists all)")
    return lines


def imbalance_warnings(report: dict) -> list[str]:
    """A line for each split whose largest class has over 5 times the smallest's images."""
    from gluon_ft.data.balance import IMBALANCE_WARNING, imbalance_ratio

    lines = []
    for split, classes in report["splits"].items():
        counts = {name: c["images"] for name, c in classes.items()}
        if counts and imbalance_ratio(counts.values()) > IMBALANCE_WARNING:
            largest, smallest = max(counts, key=counts.get), min(counts, key=counts.get)
            where = report["root"] if split == "." else f"{split}/"
            lines.append(
                f"warning: the classes of {where} are imbalanced: {largest} has "
                f"{counts[largest]} images, {smallest} {counts[smallest]} (over "
                f"{IMBALANCE_WARNING:g}x). Consider --class-weights auto or --sampler balanced, "
                "and judge the run by its balanced accuracy and per-class recall (the report)."
            )
    return lines


def add_pack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="image folder with train/<class>/* and test/<class>/*")
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX-{train,test}.rec")
    p.add_argument(
        "--resize",
        type=int,
        default=256,
        help="shorter side of the stored images, never enlarged; 0 keeps sizes (default 256)",
    )


def _run_pack(args: argparse.Namespace) -> int:
    from gluon_ft.data.recordio import manifest_path, pack_dataset

    manifest = pack_dataset(args.dir, args.out, args.resize)
    for name, split in manifest["splits"].items():
        print(f"{name}: {len(split['labels'])} image(s) packed, {len(split['skipped'])} skipped")
        for bad in split["skipped"]:
            print(f"  skipped {bad['path']}: {bad['reason']}")
    print(f"wrote {manifest_path(args.out)}; train on it with --data {args.out}")
    return 0


CHECK_DATA = Command(
    "validate an image-folder dataset and list unreadable files",
    add_check_data_arguments,
    _run_check_data,
)
PACK = Command(
    "pack an image folder into RecordIO (.rec/.idx) per split, pre-resized",
    add_pack_arguments,
    _run_pack,
)
