"""d2ext.layers.run_towers: k dense-head towers on the same input, run as one wide tower."""
import pytest
import torch
from detectron2.layers import Conv2d, get_norm
from torch import nn
from torch.nn import functional as F

from d2ext.layers import can_run_as_one, run_towers


def tower(num_convs, channels, norm, seed):
    torch.manual_seed(seed)
    layers = [Conv2d(channels, channels, 3, padding=1, bias=not norm, norm=get_norm(norm, channels),
                     activation=F.relu) for _ in range(num_convs)]
    for layer in layers:  # distinct, non-trivial parameters per tower (GN's default affine is 1 / 0)
        if layer.norm is not None:
            nn.init.uniform_(layer.norm.weight, 0.5, 1.5)
            nn.init.uniform_(layer.norm.bias, -0.5, 0.5)
    return nn.Sequential(*layers)


def separately(towers, features):
    """The reference: each tower's modules, one level at a time."""
    out = []
    for t in towers:
        per_level = []
        for feature in features:
            x = feature
            for layer in t:
                x = layer(x)
            per_level.append(x)
        out.append(per_level)
    return out


@pytest.mark.parametrize("norm", ["GN", ""])
@pytest.mark.parametrize("num_towers", [2, 3])
def test_equals_each_tower_run_alone_values_and_gradients(norm, num_towers):
    towers = [tower(3, 64, norm, seed) for seed in range(num_towers)]
    assert can_run_as_one(towers)
    features = [torch.randn(2, 64, 9, 11), torch.randn(2, 64, 5, 6)]
    got, expected = run_towers(towers, features, merge=True), separately(towers, features)
    assert len(got) == num_towers and all(len(g) == len(features) for g in got)
    for got_tower, expected_tower in zip(got, expected):
        for g, e in zip(got_tower, expected_tower):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    # Gradients reach each tower's own parameters, as when run alone.
    weights = [torch.randn_like(x) for per_tower in expected for x in per_tower]
    grads = []
    for outputs in (got, expected):
        for t in towers:
            t.zero_grad()
        sum((x * w).sum() for x, w in zip([x for per_tower in outputs for x in per_tower], weights)).backward()
        grads.append([p.grad.clone() for t in towers for p in t.parameters()])
    for g, e in zip(*grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("towers", [
    lambda: [tower(2, 32, "BN", 0), tower(2, 32, "BN", 1)],  # batch statistics would have to go back per tower
    lambda: [tower(2, 32, "GN", 0), tower(3, 32, "GN", 1)],  # unequal depths
    lambda: [tower(2, 32, "GN", 0), tower(2, 32, "", 1)],  # unequal norms
    lambda: [tower(2, 32, "GN", 0)],  # one tower: nothing to merge
    lambda: [nn.Sequential(), nn.Sequential()],  # no layers
])
def test_towers_that_cannot_merge_run_separately(towers):
    towers = towers()
    for t in towers:
        t.eval()
    assert not can_run_as_one(towers)
    features = [torch.randn(1, 32, 6, 7)]
    with torch.no_grad():
        for got_tower, expected_tower in zip(run_towers(towers, features, merge=True), separately(towers, features)):
            torch.testing.assert_close(got_tower, expected_tower)


def test_merged_only_when_asked_or_on_a_gpu(monkeypatch):
    """merge=None merges on a GPU (launch-bound at batch 1), not on a CPU (oneDNN's grouped convs are slower)."""
    towers = [tower(2, 32, "GN", 0), tower(2, 32, "GN", 1)]
    groups = []
    conv2d = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *args: groups.append(args[6]) or conv2d(*args))
    features = [torch.randn(1, 32, 4, 5)]
    with torch.no_grad():
        run_towers(towers, features)  # on the CPU: each tower's own convs
        assert groups == [1, 1, 1, 1]
        groups.clear()
        run_towers(towers, features, merge=True)  # one wide conv, then one grouped conv
        assert groups == [1, 2]
