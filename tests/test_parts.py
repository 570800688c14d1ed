"""Parts by resolution: stem, stage1..stageN, tail and head, for every family of the catalogue.

``make test`` checks one model per family against its documented stages; ``make test-all``
(``GLUON_FT_ALL_MODELS=1``) checks that every zoo name has each parameter in exactly one part.
The shape pass is symbolic, so it costs the same at any size: nothing is computed.
"""

from __future__ import annotations

import json

import mxnet as mx
import pytest
from test_graft import FAMILY_SAMPLE, GRAFT_NAMES

from gluon_ft.errors import UsageError
from gluon_ft.model.freeze import FreezePlan, freeze, is_batchnorm, select, set_lr_policy
from gluon_ft.model.graft import build_model, walk_blocks
from gluon_ft.model.parts import network_layout, shorten_paths

# stageK is the K-th resolution group from 1/4 of the input on; the stem computes at full and
# half resolution, the tail after global pooling. Blocks by attribute path, runs of numbered
# siblings shortened (features.4..15: the blocks with weights from 4 to 15).
DOCUMENTED = {
    # Gluon ResNet V1/V2: the four residual stages; V2's final BatchNorm (features.9) computes
    # at stage 4's resolution and belongs to it.
    "resnet18_v1": {
        "stem": "features.0..1",
        **{f"stage{k}": f"features.{k + 3}" for k in (1, 2, 3, 4)},
    },
    "resnet18_v2": {
        "stem": "features.0..2",
        **{f"stage{k}": f"features.{k + 4}" for k in (1, 2, 3)},
        "stage4": "features.8..9",
    },
    # GluonCV deep stem (a container) and ResNeSt: layer1..layer4 are stage1..stage4.
    "resnet18_v1b": {"stem": "conv1 bn1", **{f"stage{k}": f"layer{k}" for k in (1, 2, 3, 4)}},
    "resnest26": {"stem": "conv1 bn1", **{f"stage{k}": f"layer{k}" for k in (1, 2, 3, 4)}},
    "se_resnet18_v1": {
        "stem": "features.0..1",
        **{f"stage{k}": f"features.{k + 3}" for k in (1, 2, 3, 4)},
    },
    "se_resnet18_v2": {
        "stem": "features.0..2",
        **{f"stage{k}": f"features.{k + 4}" for k in (1, 2, 3)},
        "stage4": "features.8..9",
    },
    "resnext50_32x4d": {
        "stem": "features.0..1",
        **{f"stage{k}": f"features.{k + 3}" for k in (1, 2, 3, 4)},
    },
    "senet_154": {
        "stem": "features.0..7",
        **{f"stage{k}": f"features.{k + 9}" for k in (1, 2, 3, 4)},
    },
    # DenseNet: dense block K with the transition that precedes it (the transition pools to
    # block K's resolution); the final BatchNorm goes with block 4.
    "densenet121": {
        "stem": "features.0..1",
        "stage1": "features.4",
        "stage2": "features.5..6",
        "stage3": "features.7..8",
        "stage4": "features.9..11",
    },
    # Inception v3 by resolution: Conv2d_3b/4a (1/4), Mixed_5b-d (35 px at 299), Mixed_6a-e
    # (17 px), Mixed_7a-c (8 px). GoogLeNet likewise: conv2-3, inception 3, 4 and 5.
    "inceptionv3": {
        "stem": "features.0..2",
        "stage1": "features.4..5",
        "stage2": "features.7..9",
        "stage3": "features.10..14",
        "stage4": "features.15..17",
    },
    "googlenet": {
        "stem": "conv1",
        "stage1": "conv2 conv3",
        "stage2": "inception3a inception3b",
        "stage3": " ".join(f"inception4{c}" for c in "abcde"),
        "stage4": "inception5a inception5b",
    },
    # MobileNet v1 is a flat list of layers: its resolution groups, each opened by the
    # stride-2 depthwise convolution. V2: the bottleneck groups by resolution; its last 1x1
    # convolution computes at 1/32. V3: its 1280-channel 1x1 conv follows global pooling.
    "mobilenet0.25": {
        "stem": "features.0..7",
        "stage1": "features.9..19",
        "stage2": "features.21..31",
        "stage3": "features.33..67",
        "stage4": "features.69..79",
    },
    "mobilenetv2_0.25": {
        "stem": "features.0..3",
        "stage1": "features.4..5",
        "stage2": "features.6..8",
        "stage3": "features.9..15",
        "stage4": "features.16..21",
    },
    "mobilenetv3_small": {
        "stem": "features.0..1",
        "stage1": "features.3",
        "stage2": "features.4..5",
        "stage3": "features.6..10",
        "stage4": "features.11..15",
        "tail": "features.18",
    },
    # SqueezeNet 1.1: fire2-3, fire4-5, fire6-9.
    "squeezenet1.1": {
        "stem": "features.0",
        "stage1": "features.3..4",
        "stage2": "features.6..7",
        "stage3": "features.9..12",
    },
    # VGG's conv blocks 3-5 (blocks 1-2 compute at full and half resolution) and its two
    # Dense layers as the tail; AlexNet's first convolution already has stride 4.
    "vgg11": {
        "stem": "features.0..3",
        "stage1": "features.6..8",
        "stage2": "features.11..13",
        "stage3": "features.16..18",
        "tail": "features.21..23",
    },
    "alexnet": {
        "stage1": "features.0",
        "stage2": "features.2",
        "stage3": "features.4..6",
        "tail": "features.9..11",
    },
    # ShuffleNet's first stage (the paper's Stage2) already computes at 1/8.
    "shufflenet_v1": {
        "stem": "features.0",
        **{f"stage{k}": f"features.{k + 1}" for k in (1, 2, 3)},
    },
    "shufflenet_v2": {
        "stem": "features.0",
        "stage1": "features.2",
        "stage2": "features.3",
        "stage3": "features.4..5",
    },
    # Xception: entry blocks 1-3, the middle flow at 1/16 with block3; Xception71's block2
    # holds three blocks at three resolutions, and its exit flow computes at 1/64.
    "xception": {
        "stem": "conv1 bn1 conv2 bn2",
        "stage1": "block1",
        "stage2": "block2",
        "stage3": "block3 midflow",
        "stage4": "block20 conv3 bn3 conv4 bn4 conv5 bn5",
    },
    "xception71": {
        "stem": "conv1 bn1 conv2 bn2",
        "stage1": "block1 block2.0",
        "stage2": "block2.1",
        "stage3": "block2.2",
        "stage4": "block3 midflow",
        "stage5": "block20 conv3 bn3 conv4 bn4 conv5 bn5",
    },
    # DarkNet-53: its residual groups at 1/4..1/32, each opened by its stride-2 convolution.
    "darknet53": {
        "stem": "features.0..2",
        "stage1": "features.3..5",
        "stage2": "features.6..14",
        "stage3": "features.15..23",
        "stage4": "features.24..28",
    },
    "nasnet_4_1056": {
        "stem": "conv0",
        "stage1": "cell_stem_0",
        "stage2": "cell_stem_1 norm_1.0..3",
        "stage3": "reduction_cell_0 norm_2.0..3",
        "stage4": "reduction_cell_1 norm_3.0..3",
    },
    # Residual attention: its final BatchNorm sits in the global-pooling block (the tail).
    "residualattentionnet56": {
        "stem": "conv1",
        "stage1": "residual_block1 attention_module1",
        "stage2": "residual_block2 attention_module2",
        "stage3": "residual_block3 attention_module3",
        "stage4": "residual_block4 residual_block5 residual_block6",
        "tail": "mpool2",
    },
    "dla34": {
        "stem": "base_layer level0 level1",
        **{f"stage{k}": f"level{k + 1}" for k in (1, 2, 3, 4)},
    },
    # HRNet's own stage2..4 (each with the transition that adds its new branch) become
    # stage2..4; the classification blocks after stage 4 stay at its coarsest level.
    "hrnet_w18_small_v1_c": {
        "stem": "conv1 bn1",
        "stage1": "conv2 bn2 layer1 transition1.0",
        "stage2": "transition1.1 stage2.0",
        "stage3": "transition2.2 stage3.0",
        "stage4": "transition3.3 stage4.0 incre_blocks.0..3 downsamp_blocks.0..2 final_layer",
    },
}
# The head's path where it is not "output".
HEADS = {
    "output.0": ["squeezenet1.1", "mobilenetv2_0.25", "mobilenetv3_small"],
    "fc": [
        "resnet18_v1b",
        "resnest26",
        "xception",
        "xception71",
        "residualattentionnet56",
        "dla34",
    ],
    "classifier": ["hrnet_w18_small_v1_c"],
    "out.3": ["nasnet_4_1056"],
}


def head_path(name: str) -> str:
    return next((path for path, names in HEADS.items() if name in names), "output")


def test_every_family_of_make_test_is_documented():
    assert set(DOCUMENTED) == set(FAMILY_SAMPLE.values())


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_stages_are_the_familys_documented_stages(name):
    layout = network_layout(build_model(name, 3))
    found = {part: " ".join(shorten_paths(paths)) for part, paths in layout.paths().items()}
    assert found == {**DOCUMENTED[name], "output": head_path(name)}


def part_params(net) -> dict[str, set[int]]:
    parts = network_layout(net).parts(net)
    return {
        name: {id(p) for block in blocks for p in block.collect_params().values()}
        for name, blocks in parts.items()
        if name not in ("features", "all")
    }


@pytest.mark.parametrize("name", GRAFT_NAMES)
def test_every_parameter_is_in_exactly_one_part(name):
    net = build_model(name, 3)
    parts = part_params(net)
    assert "stage1" in parts and "output" in parts
    everything = [id(p) for p in net.collect_params().values()]
    assert sum(len(ids) for ids in parts.values()) == len(everything)
    assert set().union(*parts.values()) == set(everything)


# ----------------------------------------------------------------------------- the cases


def initialized(name: str, size: int = 32):
    net = build_model(name, 2)
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 3, size, size)))
    return net


def ids(block) -> set[int]:
    return {id(p) for p in block.collect_params().values()}


def weights(block) -> set[int]:
    """The parameters that can train (not running statistics)."""
    return {id(p) for p in block.collect_params().values() if p._differentiable}


def test_deep_stem_resnet_freezes_and_decays_its_real_stages():
    net = initialized("resnet50_v1d")
    change = freeze(net, "stage4")
    assert {id(p) for p in select(net, "stage4").params} == ids(net.layer4)
    frozen = {id(p) for p in net.collect_params().values() if p.grad_req == "null"}
    assert frozen & weights(net) == weights(net.layer4)  # layer3 and all else still train
    assert len(change.batchnorms) == sum(is_batchnorm(b) for _, b in walk_blocks(net.layer4))
    with pytest.raises(UsageError, match=r"Parts: features, output, stem, stage1..stage4, all"):
        select(net, "stage5")
    # The stem's BatchNorm is in the stem: layer-wise decay reaches it.
    applied = set_lr_policy(net, layer_decay=0.5)
    assert applied == {
        "stage4": 0.5,
        "stage3": 0.25,
        "stage2": 0.125,
        "stage1": 0.0625,
        "stem": 0.5**5,
    }
    assert net.bn1.gamma.lr_mult == net.conv1[0].weight.lr_mult == 0.5**5
    assert net.layer4[0].conv1.weight.lr_mult == 0.5


def test_unfreeze_at_stage4_unfreezes_the_last_stage():
    """docs/training.md's --unfreeze-at "0:output,2:stage4" on a deep-stem ResNet."""
    net = initialized("resnet50_v1d")
    plan = FreezePlan(unfreeze_at="0:output,2:stage4")
    plan.validate(epochs=3)
    plan.setup(net)

    def trainable() -> set[int]:
        return {id(p) for p in net.collect_params().values() if p.grad_req != "null"}

    head = ids(net.fc)
    assert trainable() == head
    plan.at_epoch(net, 2)
    assert trainable() == head | weights(net.layer4)


def test_models_parts_shows_which_blocks_make_each_part(cli):
    done = cli("models", "resnet50_v1d", "--parts")
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line.split() for line in done.stdout.splitlines()[2:]}
    assert list(lines) == ["stem", "stage1", "stage2", "stage3", "stage4", "output"]
    assert lines["stem"][1:2] + lines["stem"][3:] == ["1/2", "conv1", "bn1"]
    for k in (1, 2, 3, 4):
        scale, _, *blocks = lines[f"stage{k}"][1:]
        assert (scale, blocks) == (f"1/{2 ** (k + 1)}", [f"layer{k}"])
    assert lines["output"][2:] == ["fc"]  # no scale for the head

    done = cli("models", "densenet121", "--parts", "--json")
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)
    parts = {part["name"]: part for part in row["parts"]}
    assert parts["stage2"]["blocks"] == ["features.5..6"]  # a transition and dense block 2
    assert sum(part["params"] for part in parts.values()) == row["params"]


def test_cli_a_stage_the_network_lacks_exits_2_naming_its_parts(tiny_data, tmp_path, cli):
    common = ["train", "--data", str(tiny_data), "--model", "resnet50_v1d", "--pretrained", "none"]
    done = cli(*common, "--image-size", "32", "--freeze", "stage5", "--out", str(tmp_path / "r"))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "Unknown part 'stage5'" in done.stderr
    assert "Parts: features, output, stem, stage1..stage4, all" in done.stderr
