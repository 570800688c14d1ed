"""``gluon-ft bench --run RUN``: the top-1 agreement of the fast inference forms with float32,
judged where it means something: a trained network on the real photos of its test part.

The bench's own networks have random weights and see random inputs: their logits are near
ties, so any int8 form "disagrees" with float32 there. On a run, the agreement is computed as
``predict --dtype int8`` computes it for the 99 % floor
(:func:`gluon_ft.deploy.int8.top1_agreement`, the run's test part through the test transform),
with the run's own int8 form (:func:`gluon_ft.deploy.int8.int8_form`: the calibration in
``RUN/int8/``, made and saved there first if the run has none). The fused bfloat16 form is
judged the same way where the CPU has bfloat16.
"""

from __future__ import annotations

from pathlib import Path

NOT_MEASURED = (
    "not measured: give a finished run (gluon-ft bench --run RUN); on the bench's random "
    "network and random inputs the agreement means nothing"
)


def run_agreement(run_dir: str | Path, calibration_images: int | None = None) -> dict:
    """Top-1 agreement with float32 of the run's int8 form (and fused bfloat16) on its test part.

    Parameters
    ----------
    run_dir : str or Path
        A finished run with its ``split.json`` (its test images must still be there).
    calibration_images : int, optional
        int8: the training images to calibrate on, if the run has no such calibration yet
        (``--calibration-images``'s default by default).

    Returns
    -------
    dict
        ``{"run", "model", "image_size", "int8": {"part", "images", "top1_agreement",
        "calibration"}, "bfloat16": {...} or None}``.

    Raises
    ------
    UsageError
        Not a finished run, or its split or images are gone.
    """
    from gluon_ft.data.transforms import TestTransform
    from gluon_ft.deploy.inference import fused_bfloat16, sample_input
    from gluon_ft.deploy.int8 import DEFAULT_CALIBRATION_IMAGES, int8_form, top1_agreement
    from gluon_ft.deploy.predict import load_run
    from gluon_ft.deploy.runparts import run_parts
    from gluon_ft.isa import bfloat16_unsupported

    run = load_run(run_dir, dtype="float32")
    test = run_parts(run.path).test
    transform = TestTransform(run.image_size, run.eval_resize)
    x = sample_input(run.image_size, count=25)
    run.net(x)  # the graph the conversions read
    images = calibration_images or DEFAULT_CALIBRATION_IMAGES
    block, record = int8_form(
        run.path, run.net, run.image_size, images=images, resize=run.eval_resize
    )
    result = {
        "run": str(run.path),
        "model": run.config["model"],
        "image_size": run.image_size,
        "int8": {
            **top1_agreement(run.net, block, test, transform),
            "calibration": record["calibration"],
        },
        "bfloat16": None,
    }
    if not bfloat16_unsupported():
        fused = fused_bfloat16(run.net, x)
        result["bfloat16"] = top1_agreement(run.net, fused, test, transform)
    return result
