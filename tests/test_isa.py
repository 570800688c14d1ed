"""AMX for oneDNN: asked for at ``import gluon_ft`` where the CPU has it, safe for children.

The real checks run a fresh process, since oneDNN fixes its instruction set at its first kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gluon_ft import isa

HAS_AMX = all(flag in isa.cpu_flags() for flag in isa.AMX_CPU_FLAGS)

# One bfloat16 convolution with oneDNN's verbose log on: which kernel ran it.
BF16_CONV = (
    "import mxnet as mx\n"
    "from mxnet.contrib.amp.amp import bfloat16\n"
    "x = mx.nd.amp_cast(mx.nd.ones((2, 16, 8, 8)), dtype=bfloat16)\n"
    "w = mx.nd.amp_cast(mx.nd.ones((16, 16, 3, 3)), dtype=bfloat16)\n"
    "y = mx.nd.Convolution(x, w, kernel=(3, 3), num_filter=16, no_bias=True)\n"
    "print('sum', mx.nd.amp_cast(y, dtype='float32').asnumpy().sum())\n"
)


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


def _env(**changes) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in isa.ISA_VARIABLES}
    return {**env, "MKLDNN_VERBOSE": "1", **changes}


def _conv_kernels(stdout: str) -> list[str]:
    return [line.split(",")[4] for line in stdout.splitlines() if ",convolution," in line]


@pytest.mark.skipif(not HAS_AMX, reason="this CPU has no AMX (amx_tile, amx_bf16)")
def test_import_gluon_ft_runs_bfloat16_on_amx_and_leaves_children_safe():
    done = _run(
        "import gluon_ft, os, subprocess, sys\n"
        f"exec({BF16_CONV!r})\n"
        "print('isa', gluon_ft.ISA_SETTINGS['amx'], os.environ.get('DNNL_MAX_CPU_ISA'))\n"
        # A child started by exec has no AMX permission: it must not be told to use AMX.
        "quiet = dict(os.environ, MKLDNN_VERBOSE='0')\n"
        f"child = subprocess.run([sys.executable, '-c', {BF16_CONV!r}], env=quiet)\n"
        "print('child exit', child.returncode)\n",
        _env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "isa True None" in done.stdout
    kernels = _conv_kernels(done.stdout)
    assert len(kernels) == 1 and "amx" in kernels[0], kernels
    assert "child exit 0" in done.stdout  # not -4 (SIGILL)


@pytest.mark.skipif(not HAS_AMX, reason="this CPU has no AMX (amx_tile, amx_bf16)")
def test_plain_mxnet_does_not_use_amx_and_a_user_ceiling_is_respected():
    without = _run(BF16_CONV, _env())  # mxnet alone: oneDNN 2.4 stops at AVX-512 BF16
    assert without.returncode == 0, without.stderr[-2000:]
    assert not any("amx" in k for k in _conv_kernels(without.stdout))
    user = _run("import gluon_ft\n" + BF16_CONV, _env(DNNL_MAX_CPU_ISA="AVX512_CORE_BF16"))
    assert user.returncode == 0, user.stderr[-2000:]
    assert not any("amx" in k for k in _conv_kernels(user.stdout))


def test_configure_amx_asks_linux_first_and_never_overrides_the_user(monkeypatch):
    amx = frozenset({"avx512_bf16", "amx_bf16", "amx_tile"})
    asked, read = [], []
    monkeypatch.setattr(isa, "request_amx_permission", lambda: asked.append(1) or False)
    monkeypatch.setattr(isa, "_make_onednn_read_its_isa", lambda: read.append(dict(env)))
    env: dict = {}
    assert isa.configure_amx(env, flags=frozenset({"avx512_bf16"}))["amx"] is False
    assert asked == [] and env == {}  # no AMX on the CPU: nothing asked, nothing set
    refused = isa.configure_amx(env, flags=amx)
    assert refused["amx"] is False and "refused" in refused["why"] and env == {}
    monkeypatch.setattr(isa, "request_amx_permission", lambda: True)
    granted = isa.configure_amx(env, flags=amx)
    # The ceiling is set while oneDNN reads it, and gone afterwards.
    assert granted["amx"] is True and read == [{"DNNL_MAX_CPU_ISA": "AVX512_CORE_AMX"}]
    assert env == {}
    env = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert isa.configure_amx(env, flags=amx)["amx"] is False
    assert env == {"ONEDNN_MAX_CPU_ISA": "AVX2"} and len(read) == 1
