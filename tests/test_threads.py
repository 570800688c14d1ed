"""The OpenMP thread default: set before mxnet is imported when unset, respected when set.

Every check runs in a fresh subprocess, since MXNet reads the variables once, at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gluon_ft.threads import THREAD_VARIABLES

# Records the thread variables at the moment `mxnet` is first imported, then runs an entry
# point as a user would start it, then prints what was recorded as JSON.
PROBE = r"""
import importlib.abc, importlib.metadata, json, os, runpy, sys

seen = {}

class WatchMxnet(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mxnet" and "at_import" not in seen:
            seen["at_import"] = {v: os.environ.get(v) for v in ("OMP_NUM_THREADS",
                                                                 "MXNET_OMP_MAX_THREADS")}
        return None

sys.meta_path.insert(0, WatchMxnet())
kind, target, *argv = sys.argv[1:]
sys.argv = [target, *argv]
try:
    if kind == "module":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif kind == "script":  # a console script: its entry point, as pip's wrapper calls it
        (entry,) = importlib.metadata.entry_points(group="console_scripts", name=target)
        sys.exit(entry.load()())
    else:
        exec(target)
except SystemExit:
    pass
print("PROBE " + json.dumps(seen))
"""


def probe(kind: str, target: str, *argv: str, env_update=None, cores=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.update(env_update or {})
    done = subprocess.run(
        [sys.executable, "-c", PROBE, kind, target, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        # Restrict the child to some cores, as taskset or a container would.
        preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, done.stderr[-2000:]
    return json.loads(lines[-1][len("PROBE ") :])


ENTRY_POINTS = [
    ("script", "gluon-ft", "train", "--help"),
    ("module", "gluon_ft", "train", "--help"),
    ("module", "gluon_ft.train", "--help"),
    ("module", "gluon_ft.freeze_demo", "--help"),
    ("code", "import gluon_ft, mxnet"),  # a notebook or script that imports gluon_ft first
]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda e: " ".join(e[1:2]))
def test_every_entry_point_sets_threads_before_mxnet_import(entry):
    cores = len(os.sched_getaffinity(0))
    seen = probe(*entry)
    assert seen["at_import"] == {"OMP_NUM_THREADS": str(cores), "MXNET_OMP_MAX_THREADS": None}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 usable cores to restrict")
def test_thread_count_follows_cpu_affinity_not_cpu_count():
    one_core = {min(os.sched_getaffinity(0))}
    seen = probe("code", "import gluon_ft, mxnet", cores=one_core)
    assert seen["at_import"]["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize(
    "user, expected",
    [
        ({"OMP_NUM_THREADS": "3"}, {"OMP_NUM_THREADS": "3", "MXNET_OMP_MAX_THREADS": None}),
        ({"MXNET_OMP_MAX_THREADS": "1"}, {"OMP_NUM_THREADS": None, "MXNET_OMP_MAX_THREADS": "1"}),
    ],
    ids=["OMP_NUM_THREADS", "MXNET_OMP_MAX_THREADS"],
)
def test_user_thread_setting_is_respected(user, expected):
    seen = probe("module", "gluon_ft", "train", "--help", env_update=user)
    assert seen["at_import"] == expected


def outputs_of(*children: tuple[list[str], dict]) -> list[str]:
    """The stdout of each ``(command, environment)``, started all at once: their imports
    overlap instead of following one another."""
    started = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for command, env in children
    ]
    outputs = []
    for child in started:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err[-2000:]
        outputs.append(out)
    return outputs


def test_settings_are_recorded_and_say_who_chose():
    code = "import gluon_ft, json; print('PROBE', json.dumps(gluon_ft.THREAD_SETTINGS))"
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    # A child of a gluon-ft process inherits its choice, which is still not the user's (so
    # `gluon-ft launch` run from Python sizes its workers' pools).
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {code!r}])"
    mine, theirs, first, inherited = outputs_of(
        ([sys.executable, "-c", code], env),
        ([sys.executable, "-c", code], {**env, "OMP_NUM_THREADS": "1"}),
        ([sys.executable, "-c", "import mxnet; " + code], env),
        ([sys.executable, "-c", "import gluon_ft; " + child], env),
    )

    def settings(out):
        return json.loads(out.split("PROBE", 1)[1])

    cores = str(len(os.sched_getaffinity(0)))
    assert settings(mine) == {
        "omp_num_threads": cores,
        "source": "gluon-ft",
        "mxnet_imported_first": False,
    }
    assert settings(theirs)["source"] == "user"
    assert settings(theirs)["omp_num_threads"] == "1"
    assert settings(inherited)["source"] == "gluon-ft", inherited
    # Imported after mxnet, gluon_ft cannot size MXNet's pool any more, and says so.
    assert settings(first)["mxnet_imported_first"] is True


@pytest.mark.timeout(240)
def test_training_with_loader_worker_processes_finishes(tiny_data, tmp_path, cli):
    """Forked DataLoader workers must die on the pool's SIGTERM, not catch it as the trainer
    does (the inherited handler made the loader's cleanup wait for them forever). Forked
    from this process, as from a gluon-ft one: the trainer's handler is installed here too."""
    done = cli(
        "train", "--data", tiny_data, "--pretrained", "none", "--epochs", "1",
        "--batch-size", "4", "--image-size", "32", "--ctx", "cpu", "--workers", "2",
        "--out", tmp_path / "run", "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "model.params").is_file()


def test_a_forked_worker_dies_on_sigterm_inside_training_signal_handling():
    """The mechanism behind the test above, deterministically: the trainer catches SIGTERM to
    stop between steps, and a process forked meanwhile (a DataLoader worker) inherits that
    handler. There it must terminate the process, as the default action does."""
    import signal
    import time

    from gluon_ft.train import StopRequest

    with StopRequest() as stop:
        child = os.fork()
        if child == 0:  # the worker: idle until terminated
            time.sleep(60)
            os._exit(0)
        time.sleep(0.2)
        os.kill(child, signal.SIGTERM)
        _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert stop.signal is None  # the trainer itself was not asked to stop
