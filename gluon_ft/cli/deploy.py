"""``predict``, ``export``, ``serve`` and ``report``: the commands that use a finished run."""

from __future__ import annotations

import argparse
import sys

from gluon_ft.cli.common import Command, positive_float, positive_int


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN", help="a finished run directory")
    p.add_argument(
        "images",
        metavar="IMG",
        nargs="+",
        help="image files, or folders: every image file under a folder, at any depth (hidden "
        "names and files of no image format are left out, as training does)",
    )
    p.add_argument("--top-k", type=positive_int, default=5, help="classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON list of results")
    p.add_argument(
        "--csv",
        metavar="FILE",
        help="also write FILE: one row per image: path, class, probability, then the other "
        "top-k classes and probabilities (class_2, probability_2, ...), and error (empty if it "
        "was read); for a multi-label run: path, labels (the predicted set, joined by the "
        "run's --label-delim), each class's probability, and error",
    )
    _add_inference_dtype(p)
    add_tta_argument(p)


def _add_inference_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "int8", "auto"),
        default="float32",
        help="float32; bfloat16: the fused oneDNN graph (CPUs with avx512_bf16/amx); int8: "
        "oneDNN quantization, calibrated on the run's training images on first use (saved in "
        "RUN/int8/); auto: the fastest of bfloat16 and a calibrated int8 that a short probe "
        "measures faster here and that agrees with float32's top-1 on at least 99%% of the "
        "images (default %(default)s)",
    )
    _add_calibration_images(p)


def _add_calibration_images(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calibration-images",
        type=positive_int,
        default=200,
        metavar="N",
        help="--dtype int8: how many of the run's training images (from its split.json) "
        "calibrate the quantization (default %(default)s)",
    )


def add_tta_argument(p: argparse.ArgumentParser) -> None:
    """``--tta N`` of predict and serve."""
    from gluon_ft.data.tta import MAX_VIEWS

    p.add_argument(
        "--tta",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"test-time augmentation: average the logits of N views (1-{MAX_VIEWS}: plain, "
        "its flip, then crops of a 1.14x larger resize and their flips; see README) "
        "(default: the run's own --tta, as its report scored it; 1 is the plain center crop)",
    )


def _run_predict(args: argparse.Namespace) -> int:
    import json

    from gluon_ft.data.folders import expand_image_arguments
    from gluon_ft.deploy.predict import Predictor

    found = expand_image_arguments(args.images)
    for folder in found.empty_folders:
        print(f"{folder}: error: a folder with no image files", file=sys.stderr)
    if not found.images:
        return 2
    predictor = Predictor(
        args.run_dir, dtype=args.dtype, tta=args.tta, calibration_images=args.calibration_images
    )
    if args.dtype in ("auto", "int8"):
        print(f"gluon-ft: --dtype auto: {_describe_form(predictor.run.inference)}", file=sys.stderr)
    if found.left_out:
        print(
            f"gluon-ft: {len(found.images)} images; left out {found.left_out} hidden or "
            "non-image files inside the folders given",
            file=sys.stderr,
        )
    results = predictor.predict_images(list(found.images), top_k=args.top_k)
    if args.json:
        print(json.dumps(results, indent=2))
    for result in results:
        if not result["ok"]:
            print(f"{result['source']}: error: {result['error']}", file=sys.stderr)
        elif not args.json:
            top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in result["top"])
            if "labels" in result:  # a multi-label run: the set, then each class's probability
                top = f"labels [{', '.join(result['labels'])}]; {top}"
            print(f"{result['source']}: {top}")
    if args.csv and predictor.multi_label:
        delim = predictor.run.config.get("label_delim") or " "
        _write_rows(args.csv, results, *_set_rows(results, predictor.classes, delim))
    elif args.csv:
        _write_rows(args.csv, results, *_top_rows(results, min(args.top_k, len(predictor.classes))))
    # Exit 2 (bad input) when any file could not be classified; the others were.
    return 0 if all(r["ok"] for r in results) and not found.empty_folders else 2


def _top_rows(results: list[dict], top_k: int) -> tuple[list[str], list[list[str]]]:
    """``predict --csv``'s header and rows: the top class, then ranks 2..k as ``class_N,
    probability_N``."""
    header = ["path", "class", "probability"]
    for rank in range(2, top_k + 1):
        header += [f"class_{rank}", f"probability_{rank}"]
    rows = []
    for result in results:
        cells = [result["source"]]
        for top in result.get("top", []):
            cells += [top["class"], f"{top['probability']:.6f}"]
        rows.append(cells + [""] * (len(header) - len(cells)))
    return header, rows


def _set_rows(results: list[dict], classes: list[str], delim: str) -> tuple[list, list]:
    """A multi-label run's ``predict --csv``: the predicted set as the run's labels column
    (joined by its ``--label-delim``, so the file reads as a labels CSV does), then each
    class's own probability; top-k ranks say little where the classes do not compete."""
    rows = []
    for result in results:
        if not result["ok"]:
            rows.append([result["source"], ""] + [""] * len(classes))
            continue
        probabilities = [f"{result['probabilities'][name]:.6f}" for name in classes]
        rows.append([result["source"], delim.join(result["labels"]), *probabilities])
    return ["path", "labels", *classes], rows


def _write_rows(path: str, results: list[dict], header: list[str], rows: list[list]) -> None:
    """``predict --csv``: ``header``, then a row per image with its error (if any) last."""
    import csv

    from gluon_ft.errors import UsageError

    try:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*header, "error"])
            for result, cells in zip(results, rows):
                writer.writerow([*cells, result.get("error", "")])
    except OSError as err:
        raise UsageError(f"--csv {path}: cannot write it ({err.strerror or err}).") from None
    print(f"gluon-ft: wrote {len(results)} rows to {path}", file=sys.stderr)


def _describe_form(inference: dict) -> str:
    """What an inference ``--dtype auto`` chose, with the probe's figures."""
    line = f"{inference['dtype']} ({inference['why']}"
    probes = [inference[key] for key in ("probe", "int8_probe") if key in inference]
    if probes:
        rates = [f"float32 {probes[0]['float32_img_s']:.1f} img/s"]
        if "probe" in inference:
            rates.append(f"fused bfloat16 {inference['probe']['bfloat16_img_s']:.1f} img/s")
        if "int8_probe" in inference:
            rates.append(f"int8 {inference['int8_probe']['int8_img_s']:.1f} img/s")
        line += f"; batch {probes[0]['batch_size']}: {', '.join(rates)}"
    if "calibration" in inference:
        line += "; " + _describe_calibration(inference["calibration"])
    return line + ")"


def _describe_calibration(record: dict) -> str:
    """How the run's int8 form was calibrated, and how often it agrees with float32."""
    agreement = record["test_agreement"]
    return (
        f"int8 calibrated on {record['calibration']['images']} training images; top-1 "
        f"agreement with float32 {100 * agreement['top1_agreement']:.1f} % on the "
        f"{agreement['images']} images of the test part"
    )


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN", help="a finished run directory")
    p.add_argument("--format", choices=("mxnet", "onnx", "all"), default="all", help="default: all")
    p.add_argument("--out", help="output folder (default RUN/export)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "int8"),
        default="float32",
        help="bfloat16: the fused oneDNN graph; int8: the quantized one (see predict --dtype); "
        "both MXNet format only (default %(default)s)",
    )
    _add_calibration_images(p)


def _run_export(args: argparse.Namespace) -> int:
    from gluon_ft.deploy.export import FORMATS, export_run

    formats = FORMATS if args.format == "all" else (args.format,)
    if args.format == "all" and args.dtype != "float32":
        formats = ("mxnet",)
        print(f"gluon-ft: --dtype {args.dtype} exports the MXNet format only", file=sys.stderr)
    for fmt in formats:
        result = export_run(args.run_dir, fmt, args.out, args.dtype, args.calibration_images)
        if "calibration" in result:
            print(f"gluon-ft: {_describe_calibration(result['calibration'])}", file=sys.stderr)
        print(
            f"{fmt}: wrote {', '.join(result['files'])} to {result['out_dir']}; checked with "
            f"{result['checked_with']}: max abs diff {result['max_abs_diff']:.3g} "
            f"(<= {result['tolerance']:g})"
        )
    return 0


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN", help="a finished run directory (gluon-ft train)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default %(default)s: only programs on this machine can "
        "connect). --host 0.0.0.0 listens on every network interface: anyone who can reach this "
        "machine can then use the model and upload files to it, over plain HTTP, without a "
        "password",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default %(default)s)")
    p.add_argument(
        "--max-upload-mb",
        type=positive_float,
        default=10.0,
        metavar="MB",
        help="largest upload accepted, in MiB (default %(default)s); larger ones get HTTP 413",
    )
    p.add_argument(
        "--max-pixels",
        type=_pixel_cap,
        default=24_000_000,
        metavar="N",
        help="largest image decoded, in pixels (default %(default)s: a 6000x4000 photo; the "
        "decode costs 8 to 20 bytes a pixel). Larger ones get HTTP 413 from their header, "
        "before any decoding; a baseline JPEG is decoded at 1/2, 1/4 or 1/8 scale instead when "
        "that fits",
    )
    p.add_argument(
        "--max-queue",
        type=positive_int,
        default=128,
        metavar="N",
        help="most /predict requests in progress at once, for memory: each may hold an upload "
        "(default %(default)s); more get HTTP 503 with Retry-After",
    )
    _add_batching_arguments(p)
    p.add_argument("--ctx", default="cpu", help="the one device to run on: cpu | gpu:N")
    _add_inference_dtype(p)
    add_tta_argument(p)


def _add_batching_arguments(p: argparse.ArgumentParser) -> None:
    """``serve``'s batching: requests that arrive together share a forward pass."""
    p.add_argument(
        "--max-wait-s",
        type=positive_float,
        default=2.0,
        metavar="S",
        help="a request that would wait longer than this for its answer (judged from the "
        "passes ahead of it) gets HTTP 503 with Retry-After (default %(default)s)",
    )
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=16,
        metavar="N",
        help="most requests classified in one forward pass (default %(default)s)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=_milliseconds,
        default=5.0,
        metavar="MS",
        help="how long a request waits for others to share its forward pass (default "
        "%(default)s; 0: only those already waiting)",
    )


def _milliseconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1000:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be between 0 and 1000, got {text}")
    return value


def _pixel_cap(text: str) -> int:
    from PIL import Image

    value = positive_int(text)
    if value > Image.MAX_IMAGE_PIXELS:
        raise argparse.ArgumentTypeError(
            f"must be at most {Image.MAX_IMAGE_PIXELS} (the image decoder refuses more as a "
            f"possible decompression bomb), got {value}"
        )
    return value


def _run_serve(args: argparse.Namespace) -> int:
    from gluon_ft.errors import UsageError

    try:
        from gluon_ft.deploy.serve import is_loopback_name, serve
    except ImportError as err:
        raise UsageError(
            f"gluon-ft serve needs the serve extra ({err.name} is missing): "
            "pip install 'gluon-ft[serve]'"
        ) from None
    from gluon_ft.train import parse_contexts

    contexts = parse_contexts(args.ctx)
    if len(contexts) != 1:
        raise UsageError(f"--ctx {args.ctx}: gluon-ft serve runs on one device, e.g. gpu:0.")
    if not is_loopback_name(args.host):
        print(
            f"gluon-ft: warning: --host {args.host} lets other machines reach this server; "
            "it has no password and uses plain HTTP.",
            file=sys.stderr,
        )
    url = f"http://{args.host}:{args.port}/"
    print(f"gluon-ft: loading {args.run_dir}; then open {url}", flush=True)
    serve(
        args.run_dir,
        args.host,
        args.port,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=args.max_pixels,
        max_queue=args.max_queue,
        ctx=contexts[0],
        dtype=args.dtype,
        on_loaded=lambda run: print(
            f"gluon-ft: serving in {_describe_form(run.inference)}", flush=True
        ),
        tta=args.tta,
        calibration_images=args.calibration_images,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_wait_s=args.max_wait_s,
    )
    return 0


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN", help="a finished run directory")
    p.add_argument(
        "--split",
        default="test",
        metavar="test|val|DIR",
        help="the run's test or val part (from its split.json), or a folder DIR/<class>/* "
        "(default %(default)s)",
    )
    p.add_argument("--out", help="output folder (default RUN for test, else RUN/report-<name>)")


def _run_report(args: argparse.Namespace) -> int:
    from gluon_ft.deploy.report import build_report

    summary, out = build_report(args.run_dir, args.split, args.out)
    if summary.get("multi_label"):
        return _print_multilabel_report(summary, out)
    accuracy = next(value for key, value in summary.items() if key.endswith("_acc"))
    print(
        f"{summary['split']}: {summary['images']} images, accuracy {accuracy:.3f}, balanced "
        f"accuracy {summary['balanced_acc']:.3f}, macro-F1 {summary['macro_f1']:.3f}"
    )
    for row in summary["per_class"]:
        print(
            f"  {row['class']:<24} precision {row['precision']:.3f}  recall {row['recall']:.3f}"
            f"  F1 {row['f1']:.3f}  support {row['support']}"
        )
    print(f"wrote {out / 'report.md'}, confusion.png, mistakes.png and summary.json")
    return 0


def _print_multilabel_report(summary: dict, out) -> int:
    mean_ap = next(value for key, value in summary.items() if key.endswith("_map"))
    print(
        f"{summary['split']}: {summary['images']} images, mAP {mean_ap:.3f}, micro-F1 "
        f"{summary['f1_micro']:.3f}, macro-F1 {summary['f1_macro']:.3f}, exact sets "
        f"{summary['exact_match']:.3f}"
    )
    for row in summary["per_class"]:
        ap = "-" if row["ap"] is None else f"{row['ap']:.3f}"
        print(
            f"  {row['class']:<24} AP {ap:<5}  precision {row['precision']:.3f}  recall "
            f"{row['recall']:.3f}  F1 {row['f1']:.3f}  support {row['support']}"
        )
    print(f"wrote {out / 'report.md'}, pr_curves.png, mistakes.png and summary.json")
    return 0


PREDICT = Command(
    "classify image files (or folders of them) with a finished run",
    add_predict_arguments,
    _run_predict,
)
EXPORT = Command(
    "export a run as MXNet symbol+params and as ONNX, each verified",
    add_export_arguments,
    _run_export,
)
# A server idles between requests and shares the cores with its clients: OpenMP threads that
# spin-wait starve them (8 clients x 25 requests on 2 busy cores: 2 to 12 requests/s, p95 1.2
# to 9.4 s; passive: 53 to 64 requests/s, p95 0.18 to 0.24 s).
SERVE = Command(
    "serve a finished run: a web page and a JSON API, on 127.0.0.1 by default",
    add_serve_arguments,
    _run_serve,
    environment={"OMP_WAIT_POLICY": "PASSIVE"},
)
REPORT = Command(
    "per-class report of a finished run on its test split or any folder",
    add_report_arguments,
    _run_report,
)
