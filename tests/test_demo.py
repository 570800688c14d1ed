"""``gluon-ft demo`` at a reduced size: every step runs, writes its files, and reuses its cache.

The task's determinism is tested in ``tests/test_synthetic.py``; here it is the demo around it.
At this size (a handful of 32-px images, two epochs) no variant learns much: the accuracy
comparison only checks that fine-tuning does not do worse than training from scratch. The
real gap needs the default sizes (``make demo``, minutes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import record_steps
from PIL import Image

from gluon_ft.data.synthetic import SMALL_SPEC
from gluon_ft.demo import REAL_RUN_NOTE, DemoConfig, run_demo
from gluon_ft.errors import Interrupted

EPOCHS = 2
VARIANTS = ("fine-tuned", "scratch", "frozen")


def small_demo(cache: Path, out: Path) -> DemoConfig:
    """Explicit sizes: the tests must not depend on the defaults' (which are tuned for
    ``make demo``)."""
    return DemoConfig(
        seed=0,
        spec=SMALL_SPEC,
        epochs=EPOCHS,
        pretrain_epochs=2,
        batch_size=8,
        pretrain_batch_size=16,
        cache_dir=cache,
        out=out,
        progress=False,
    )


def source_runs(cache: Path) -> list[Path]:
    """The run directories of every pretraining in ``cache``."""
    return sorted(cache.glob("source-*.run"))


@pytest.fixture(scope="module")
def first_demo(tmp_path_factory) -> dict:
    """One demo run on an empty cache (the expensive pretraining happens here, once)."""
    root = tmp_path_factory.mktemp("demo")
    log: list[str] = []
    # Module scope runs before the per-test MXNET_HOME isolation; the frozen variant's
    # feature cache must not go to the user's ~/.mxnet either.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MXNET_HOME", str(root / "mxnet-home"))
        result = run_demo(small_demo(root / "cache", root / "first"), log=log.append)
    return {"result": result, "log": log, "cache": root / "cache"}


def comparable(history: list[dict]) -> list[dict]:
    """An epoch history without its timings, which differ between identical runs."""
    return [
        {k: v for k, v in row.items() if k not in ("seconds", "examples_per_sec")}
        for row in history
    ]


def test_every_variant_runs_on_the_target_with_its_recipe(first_demo):
    result = first_demo["result"]
    results = result["results"]
    assert tuple(results) == VARIANTS
    params = Path(result["source_params"])
    for name, run in results.items():
        assert [row["epoch"] for row in run["history"]] == list(range(1, EPOCHS + 1)), name
        assert run["test_acc"] == run["history"][-1]["test_acc"]
        run_dir = Path(run["run_dir"])
        assert run_dir.parent == result["out"]
        assert json.loads((run_dir / "metrics.json").read_text()) == run["history"]
        config = json.loads((run_dir / "config.json").read_text())
        assert config["data"] == result["task"]["target"]
        assert config["image_size"] == SMALL_SPEC.image_size
        if name == "scratch":
            assert config["pretrained"] == "none" and config["source_classes"] is None
        else:  # the graft of the source model pretrained in step 2
            assert config["pretrained"] == str(params)
            assert config["source_classes"] == SMALL_SPEC.n_source_classes
        assert (config["freeze"] == "features") == (name == "frozen")
    sidecar = json.loads(params.with_suffix(".json").read_text())
    assert sidecar["model"] == DemoConfig.model
    assert len(sidecar["classes"]) == SMALL_SPEC.n_source_classes


def test_fine_tuned_is_not_worse_than_scratch(first_demo):
    """A weak check at this size: seeds 0-5 all gave 0.25 (chance) for every variant.

    The real gap needs the default sizes, which take minutes.
    """
    results = first_demo["result"]["results"]
    assert results["fine-tuned"]["test_acc"] >= results["scratch"]["test_acc"]


def test_plots_and_summary_are_written(first_demo):
    result = first_demo["result"]
    out = result["out"]
    for png in (result["comparison_png"], result["samples_png"]):
        assert Path(png).parent == out
        with Image.open(png) as image:
            image.verify()  # a complete, undamaged PNG
        with Image.open(png) as image:
            assert image.format == "PNG"
            assert min(image.size) >= 100
            # Not a blank canvas: a plot has many distinct colours.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 0
    assert summary["source_params"] == result["source_params"]
    assert list(summary["results"]) == list(VARIANTS)
    for name in VARIANTS:
        assert summary["results"][name]["history"] == result["results"][name]["history"]


def test_second_run_reuses_task_and_source_and_repeats_the_numbers(first_demo, tmp_path):
    cache = first_demo["cache"]
    assert any(line.startswith("[1/5] task: generated") for line in first_demo["log"])
    assert any(line.startswith("[2/5] pretraining") for line in first_demo["log"])
    params = Path(first_demo["result"]["source_params"])
    before = {p: p.stat().st_mtime_ns for p in (params, params.with_suffix(".json"))}
    task_json = Path(first_demo["result"]["task"]["target"]).parent / "task.json"
    task_mtime = task_json.stat().st_mtime_ns
    runs_before = source_runs(cache)
    assert len(runs_before) == 1

    log: list[str] = []
    again = run_demo(small_demo(cache, tmp_path / "again"), log=log.append)

    assert any(line.startswith("[1/5] task: reused") for line in log), log
    assert f"[2/5] source model: reused {params}" in log
    assert not any("pretraining" in line for line in log)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert task_json.stat().st_mtime_ns == task_mtime
    assert source_runs(cache) == runs_before
    # The same seed on the same task and source: the same numbers, epoch by epoch.
    for name in VARIANTS:
        first = first_demo["result"]["results"][name]["history"]
        assert comparable(again["results"][name]["history"]) == comparable(first), name


def test_demo_command_prints_the_table_the_gain_and_the_real_run_note(tmp_path, cli):
    out = tmp_path / "out"
    args = ["demo", "--size", "small", "--epochs", "1", "--pretrain-epochs", "1"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress"]
    result = cli(*args)  # MXNET_HOME: the test's own (conftest)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "test accuracy on the target task" in lines
    header = lines[lines.index("test accuracy on the target task") + 1].split()
    assert header == ["epoch", *VARIANTS]
    final = next(line for line in lines if line.startswith("final")).split()
    assert len(final) == 1 + len(VARIANTS)
    summary = json.loads((out / "summary.json").read_text())
    assert [float(x) for x in final[1:]] == [
        round(summary["results"][name]["test_acc"], 3) for name in VARIANTS
    ]
    gain = summary["results"]["fine-tuned"]["test_acc"] - summary["results"]["scratch"]["test_acc"]
    assert f"fine-tuned - scratch: {100 * gain:+.1f} points after 1 epoch" in lines
    assert "In the real hot-dog run" in result.stdout
    assert REAL_RUN_NOTE in result.stdout
    assert "Traceback" not in result.stderr
    assert (out / "comparison.png").is_file() and (out / "samples.png").is_file()


def test_ctrl_c_tells_to_run_the_demo_again_and_the_cache_survives(
    first_demo, tmp_path, monkeypatch
):
    """train's "--resume" hint would be wrong here: the demo has no such flag."""
    record_steps(monkeypatch, signal_after=1)
    log: list[str] = []
    with pytest.raises(Interrupted, match="Run it again: the generated task and a finished"):
        run_demo(small_demo(first_demo["cache"], tmp_path / "stopped"), log=log.append)
    assert "--resume" not in "\n".join(log)
    assert log[-1].startswith("[3/5] fine-tuned")  # stopped in the first variant
    assert Path(first_demo["result"]["source_params"]).is_file()  # the cache is intact
