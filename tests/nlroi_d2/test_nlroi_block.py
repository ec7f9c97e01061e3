"""NLRoIBlock against a loop reference written here, per-image independence and edge cases."""
import math

import pytest
import torch

from nlroi_d2 import NLRoIBlock

D, DF, DG, H, W = 6, 3, 4, 5, 5


def make_block(scale_affinity=False, seed=0):
    torch.manual_seed(seed)
    block = NLRoIBlock(D, DF, DG, scale_affinity=scale_affinity)
    # Larger embeddings than the init so that the attention is far from uniform.
    with torch.no_grad():
        block.phi.weight.normal_(std=0.3)
        block.psi.weight.normal_(std=0.3)
    return block


def loop_reference(block, x, num_per_image):
    """Eq. 1-2 of the paper, one RoI pair at a time, within each image."""
    phi = block.phi(x).flatten(1).tolist()
    psi = block.psi(x).flatten(1).tolist()
    g = block.g(x).mean(dim=(2, 3)).tolist()
    scale = 1.0 / math.sqrt(len(phi[0])) if block.scale_affinity and phi else 1.0
    rows = []
    start = 0
    for count in num_per_image:
        members = range(start, start + count)
        for i in members:
            logits = [scale * sum(a * b for a, b in zip(phi[i], psi[j])) for j in members]
            top = max(logits)
            weights = [math.exp(v - top) for v in logits]
            total = sum(weights)
            rows.append([sum(w / total * g[j][c] for w, j in zip(weights, members)) for c in range(DG)])
        start += count
    y = torch.tensor(rows, dtype=x.dtype).reshape(-1, DG)
    return torch.cat([x, y[:, :, None, None].expand(-1, -1, H, W)], dim=1)


@pytest.mark.parametrize("scale_affinity", [False, True])
@pytest.mark.parametrize("num_per_image", [[3], [2, 4], [0, 3, 1], [1, 0, 0], [4, 0]])
def test_matches_loop_reference(num_per_image, scale_affinity):
    block = make_block(scale_affinity)
    x = torch.randn(sum(num_per_image), D, H, W)
    with torch.no_grad():
        out = block(x, num_per_image)
        expected = loop_reference(block, x, num_per_image)
    assert out.shape == (x.shape[0], D + DG, H, W)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_attention_is_not_trivial():
    """Guard for the reference test: the non-local feature depends on the other RoIs of the image."""
    block = make_block()
    x = torch.randn(4, D, H, W)
    with torch.no_grad():
        together = block(x, [4])[:, D:, 0, 0]
        alone = torch.cat([block(x[i:i + 1], [1])[:, D:, 0, 0] for i in range(4)])
    assert (together - alone).abs().max() > 1e-3


def test_per_image_independence():
    """An image's output alone equals its output inside a batch with other images (and empty ones)."""
    block = make_block()
    counts = [3, 0, 5, 1]
    x = torch.randn(sum(counts), D, H, W)
    with torch.no_grad():
        batched = block(x, counts)
        start = 0
        for count in counts:
            alone = block(x[start:start + count], [count])
            torch.testing.assert_close(batched[start:start + count], alone, rtol=1e-5, atol=1e-6)
            start += count


def test_single_roi_gets_its_own_g():
    block = make_block()
    x = torch.randn(1, D, H, W)
    with torch.no_grad():
        out = block(x, [1])
        torch.testing.assert_close(out[:, D:, 2, 3], block.g(x).mean(dim=(2, 3)))


def test_zero_rois_trains_every_parameter():
    """N = 0 gives a (0, D + Dg, H, W) output and a graph reaching every parameter (DDP)."""
    block = make_block()
    x = torch.zeros(0, D, H, W, requires_grad=True)
    out = block(x, [0, 0])
    assert out.shape == (0, D + DG, H, W)
    out.sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None, name


def test_gradients_reach_all_parameters_and_are_finite():
    block = make_block()
    x = torch.randn(7, D, H, W, requires_grad=True)
    block(x, torch.tensor([4, 0, 3])).pow(2).sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_large_affinities_are_stable():
    """Unscaled dot products in the thousands (fp32 exp overflows at ~89) still give a finite softmax."""
    block = make_block()
    with torch.no_grad():
        block.phi.weight.fill_(1.0)
        block.psi.weight.fill_(1.0)
    x = torch.rand(5, D, H, W) * 10
    out = block(x, [2, 3])
    assert torch.isfinite(out).all()


def test_bf16_autocast_matches_fp32():
    block = make_block()
    x = torch.randn(6, D, H, W)
    with torch.no_grad():
        reference = block(x, [2, 4])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = block(x, [2, 4])
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed.float(), reference, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("counts, message", [([2, 2], "sums to 4"), ([], "empty"), ([4, -1], "negative")])
def test_bad_counts_are_named(counts, message):
    block = make_block()
    with pytest.raises(ValueError, match=message):
        block(torch.randn(3, D, H, W), counts)


def test_bad_input_shape_and_channels():
    with pytest.raises(ValueError, match="in_channels"):
        NLRoIBlock(0, 2, 2)
    with pytest.raises(ValueError, match=r"expects \(N, 6, H, W\)"):
        make_block()(torch.randn(3, D + 1, H, W), [3])
