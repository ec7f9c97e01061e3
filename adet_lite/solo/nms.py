"""Duplicate removal for grid-based instance segmentation: point NMS on the category grid, Matrix NMS
(SOLOv2) and greedy mask NMS."""
import torch
import torch.nn.functional as F
from detectron2.utils.env import TORCH_VERSION

from d2ext.layers import stable_argsort

MATRIX_NMS_KERNELS = ("gaussian", "linear")


def point_nms(category_scores):
    """Keep the local maxima of the category grid (a 2x2 max-pool window ending at each cell).

    Args:
        category_scores: (B, C, S, S) probabilities.
    Returns:
        (B, C, S, S): the scores where a cell is a maximum of its 2x2 window (ties kept), else 0.
    """
    window_max = F.max_pool2d(category_scores, kernel_size=2, stride=1, padding=1)
    # padding=1 gives an (S+1, S+1) map; entry (i, j) covers cells (i-1..i, j-1..j).
    keep = window_max[..., :-1, :-1] == category_scores
    return category_scores * keep


def pair_intersections(flat):
    """Pixels shared by every pair of binary masks: (N, P) bool or 0/1 -> (N, N) float counts.

    For bool masks on a CPU the product is taken in int8 with int32 sums (``torch._int_mm``, CPU kernel
    since torch 2.3): exact like float32 (counts below 2**31; float32 is exact below 2**24) and faster on
    x86 CPUs from AVX2 on: for 500 masks of 200 x 336 at one thread 18.6 ms against 265 ms with the float32
    conversion (AMX; oneDNN limited to AVX2: 181 ms; docs/adet_lite_solo.md). Elsewhere, and under a trace
    (whose graph may be replayed on a GPU, where ``_int_mm`` has shape constraints), float32.
    """
    if flat.dtype == torch.bool and flat.device.type == "cpu" and TORCH_VERSION >= (2, 3) \
            and not torch.jit.is_tracing():
        as_int8 = flat.view(torch.int8)  # the same bytes: 0 / 1
        return torch._int_mm(as_int8, as_int8.T).float()
    flat = flat.float()
    return flat @ flat.T


def mask_iou_matrix(masks):
    """IoU of every pair of binary masks: (N, H, W) or (N, H * W) -> (N, N). Empty pairs have IoU 0."""
    intersection = pair_intersections(masks.flatten(1))
    areas = intersection.diagonal()  # a mask's overlap with itself; a sum over its pixels costs more
    union = areas[:, None] + areas[None, :] - intersection
    return intersection / union.clamp(min=1.0)


def same_label_mask_iou(masks, labels):
    """IoU of every pair of binary masks with the same label, 0 for pairs with different labels.

    Both NMS forms below read only the same-label pairs. On a CPU, where the matrix product is most of
    their time, only those blocks are computed: over L labels of similar counts about 1 / L of the whole
    matrix's arithmetic. Elsewhere the whole matrix is one product (1.1 ms for 500 masks on an H100) where
    the blocks would cost a product, an indexing and a host read per label; and a trace gets it too, as the
    blocks' sizes depend on the labels, which a trace would freeze.

    Args:
        masks: (N, H, W) binary masks; labels: (N,) class indices.
    Returns:
        (N, N) IoUs, in the input order.
    """
    if torch.jit.is_tracing() or masks.device.type != "cpu":
        return mask_iou_matrix(masks) * (labels[:, None] == labels[None, :])
    flat = masks.flatten(1)
    by_label = stable_argsort(labels)
    counts = torch.unique_consecutive(labels[by_label], return_counts=True)[1]
    iou = torch.zeros(len(labels), len(labels), device=masks.device)
    for members in by_label.split(counts.tolist()):
        iou[members[:, None], members[None, :]] = mask_iou_matrix(flat[members])
    return iou


def matrix_nms(masks, labels, scores, kernel="gaussian", sigma=2.0):
    """Matrix NMS (SOLOv2): decay each score by its overlap with higher-scored masks of its class.

    With masks sorted by decreasing score, IoU_ij counts only pairs i < j of the same label (else 0),
    compensation_i = max_k IoU_ki (how much i itself is suppressed), and
    ``decay_j = min_i f(IoU_ij) / f(compensation_i)`` over all i, with
    f(x) = exp(-sigma * x^2) ("gaussian") or 1 - x ("linear").

    Args:
        masks: (N, H, W) binary masks (bool or 0/1).
        labels: (N,) class indices.
        scores: (N,) scores.
    Returns:
        (N,) decayed scores, in the input order.
    """
    if kernel not in MATRIX_NMS_KERNELS:
        raise ValueError(f"matrix_nms: kernel must be one of {MATRIX_NMS_KERNELS}, got {kernel!r}")
    if not (masks.shape[0] == labels.shape[0] == scores.shape[0]):
        raise ValueError(f"matrix_nms: {masks.shape[0]} masks, {labels.shape[0]} labels, "
                         f"{scores.shape[0]} scores")
    order = stable_argsort(scores, descending=True)
    iou = same_label_mask_iou(masks, labels)[order][:, order].triu(diagonal=1)
    # The reductions over dim 0 get one extra row that changes nothing (IoUs are >= 0; the first row of
    # ``ratio`` is <= 1): with N = 0 they are then defined, with no branch on N (so that it traces).
    compensation = F.pad(iou, (0, 0, 0, 1)).max(dim=0).values[:, None]  # (N, 1): row i holds compensation_i
    if kernel == "gaussian":
        ratio = torch.exp(-sigma * (iou ** 2 - compensation ** 2))
    else:
        # An exact duplicate (compensation 1) must not divide by zero.
        ratio = (1 - iou) / (1 - compensation).clamp(min=1e-6)
    decay = F.pad(ratio, (0, 0, 0, 1), value=1.0).min(dim=0).values
    decayed = torch.empty_like(scores)
    decayed[order] = scores[order] * decay
    return decayed


def mask_nms(masks, labels, scores, iou_threshold=0.5):
    """Greedy mask NMS: visit masks by decreasing score, drop later same-class masks with IoU > threshold.

    Args:
        masks: (N, H, W) binary masks; labels: (N,); scores: (N,).
    Returns:
        (K,) indices (into the inputs) of the kept masks, by decreasing score.
    """
    order = stable_argsort(scores, descending=True)
    suppresses = (same_label_mask_iou(masks, labels)[order][:, order] > iou_threshold).triu(diagonal=1)
    # Sequential by definition: whether i suppresses others depends on whether i itself survived. The
    # loop runs on the host: on a GPU, reading ``suppressed[i]`` there would synchronise once per mask.
    suppresses = suppresses.cpu()
    suppressed = torch.zeros(order.shape[0], dtype=torch.bool)
    for i in range(order.shape[0]):
        if not suppressed[i]:
            suppressed |= suppresses[i]
    return order[~suppressed.to(order.device)]
