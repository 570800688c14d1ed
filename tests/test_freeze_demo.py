"""``python -m gluon_ft.freeze_demo`` runs offline and proves what freezing does.

Its ``main`` runs in this process; test_threads starts ``python -m gluon_ft.freeze_demo`` itself.
"""

from __future__ import annotations

import re

from gluon_ft.freeze_demo import main

SMALL = [
    "--image-size",
    "32",
    "--batch-size",
    "4",
    "--steps",
    "2",
    "--time-size",
    "32",
    "--time-batch",
    "4",
    "--warmup",
    "1",
    "--repeats",
    "2",
]


def test_freeze_demo_runs_offline_and_prints_the_table_and_the_proof(capsys):
    # MXNET_HOME is an empty temporary folder (conftest): no cached ImageNet weights.
    code = main(SMALL)
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    no_weights = [line for line in out.splitlines() if "No ImageNet weights cached" in line]
    assert len(no_weights) == 1 and "random initialization" in no_weights[0]
    assert "ResNetV2(" in out and "Conv2D(3 -> 64, kernel_size=(7, 7)" in out
    assert re.search(r"_conv0_weight: grad_req='write'", out)
    # The table, with its header and totals.
    assert re.search(r"^name +shape +grad_req +lr_mult +wd_mult +count$", out, re.M)
    assert re.search(r"_dense0_weight +2x512 +write +10 +1 +1,024$", out, re.M)
    assert "trainable: 1,026 in 2 parameter(s)" in out
    # The proof: frozen parts bitwise unchanged, running statistics included; the head moved.
    for part in ("features", "stem", "stage1", "stage2", "stage3", "stage4"):
        assert re.search(rf"^{part} +0 +0  unchanged \(bitwise\)$", out, re.M), part
    assert re.search(r"^output +[0-9.e-]+ +0  changed$", out, re.M)
    assert "PROOF: every frozen parameter and BatchNorm running statistic is bitwise" in out
    # Why BatchNorm must be frozen too: the train/eval gap closes.
    naive = float(re.search(r"grad_req='null' alone .*: ([0-9.e+-]+)", out).group(1))
    frozen = float(re.search(r"freeze\(net, 'features'\) .*: ([0-9.e+-]+)", out).group(1))
    assert naive > 0.1 and frozen < 1e-4
    assert re.search(r"frozen features: [0-9.]+ img/s", out)
    assert re.search(r"full fine-tune: +[0-9.]+ img/s", out)
