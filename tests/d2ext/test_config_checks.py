"""d2ext.config_checks: range requirements of config values and norm names, with errors that name the key."""
import pytest
from detectron2.config import CfgNode as CN

from d2ext.config_checks import COUNT, FRACTION, check_norm, check_values, one_of


def _node():
    node = CN()
    node.NUM = 3
    node.LOSS = CN()
    node.LOSS.WEIGHT = 0.5
    node.KIND = "a"
    return node


def test_check_values_accepts_values_in_range_and_reads_dotted_keys():
    check_values(_node(), "MODEL.X", {"NUM": COUNT, "LOSS.WEIGHT": FRACTION, "KIND": one_of("a", "b")})


@pytest.mark.parametrize("key, value, message", [
    ("NUM", 0, "MODEL.X.NUM must be an integer >= 1, got 0"),
    ("LOSS.WEIGHT", 1.5, "MODEL.X.LOSS.WEIGHT must be in [0, 1], got 1.5"),
    ("KIND", "c", "MODEL.X.KIND must be one of ('a', 'b'), got 'c'"),
])
def test_check_values_names_the_first_key_out_of_range(key, value, message):
    node = _node()
    parent = node.LOSS if key == "LOSS.WEIGHT" else node
    parent[key.split(".")[-1]] = value
    with pytest.raises(ValueError) as error:
        check_values(node, "MODEL.X", {"NUM": COUNT, "LOSS.WEIGHT": FRACTION, "KIND": one_of("a", "b")})
    assert str(error.value) == message


def test_check_norm():
    for norm in ("", "BN", "SyncBN", "FrozenBN", "GN"):
        check_norm("MODEL.X.NORM", norm, {"MODEL.X.CHANNELS": 64})
    with pytest.raises(ValueError, match="MODEL.X.NORM 'LayerNorm2d' is not a norm Detectron2's get_norm knows"):
        check_norm("MODEL.X.NORM", "LayerNorm2d", {"MODEL.X.CHANNELS": 64})
    with pytest.raises(ValueError, match="MODEL.X.NORM 'GN' cannot normalise the 48 channels of MODEL.X.CHANNELS"):
        check_norm("MODEL.X.NORM", "GN", {"MODEL.X.CHANNELS": 48})
