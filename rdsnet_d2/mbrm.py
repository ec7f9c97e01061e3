"""MBRM: mask based boundary refinement (RDSNet, Sec. 3.3), as a standalone module.

Each box side is re-estimated from a soft instance mask by Bayes' rule along one axis:
likelihood from a learned 1-D edge detector run over the mask's max-projection profile, prior a
truncated Gaussian centred on the regressed side, result the posterior's argmax.

Pixel convention (Detectron2's continuous boxes): pixel column ``c`` covers ``[c, c + 1)``, and an
*edge position* ``e`` (an integer in ``0..W``) is the line between columns ``e - 1`` and ``e``. The
official kernel responds most at the last background pixel before an object (left/top) and, flipped,
at the first background pixel after it (right/bottom); so the left edge ``e`` is scored by the
detector output at column ``e - 1`` and the right edge ``e`` by the flipped detector at column ``e``.
For a mask covering columns 15..44 the official code returns the pixel indices l = 14, r = 45 (a box
one pixel too wide on the left in its inclusive "+1" convention); here it returns the continuous
edges x1 = 15, x2 = 45, i.e. ``(l + 1, r)``. The prior is centred on the regressed continuous edge, so
an uninformative mask leaves a box where it was. Columns outside the image read as background, so an
edge may land on the image border (e = 0 or e = W).
"""
import math

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from d2ext.config_checks import check_values

from .config import MBRM_REQUIREMENTS

# The constants of the official release (hard-coded there; released checkpoints hold no MBRM weights).
OFFICIAL_KERNEL = (-0.2968, -0.2892, -0.2635, -3.2545, -0.1874, 2.5041, 0.0196, 0.0651, 0.0917)
OFFICIAL_BIAS = -1.9536


def cat_profiles(profile_chunks, image_size, device=None):
    """Concatenate the ``MBRM.profiles`` of consecutive chunks of soft masks (computing profiles chunk
    by chunk keeps full-size soft masks of only one chunk in memory).

    Args:
        profile_chunks: list of (x (n_i, W), y (n_i, H)); may be empty.
        image_size: (H, W), for the shape of an empty result.
    Returns:
        x (N, W), y (N, H) with N = sum n_i.
    """
    height, width = image_size
    if not profile_chunks:
        return torch.zeros(0, width, device=device), torch.zeros(0, height, device=device)
    x_profiles, y_profiles = zip(*profile_chunks)
    return torch.cat(x_profiles), torch.cat(y_profiles)


class MBRM(nn.Module):
    """Refine boxes with soft instance masks.

    ``MBRM()`` (or ``MBRM(cfg)``, from ``MODEL.MBRM.*``) uses the official released kernel (s = 4) and
    constants (gamma 0.05, prior truncated at density 0.0044). Another ``kernel_half_size`` starts from a
    zero kernel (flat likelihood: the posterior is the prior, boxes stay put) and must be trained
    (:meth:`loss`).
    """

    @configurable
    def __init__(self, kernel_half_size=4, gamma=0.05, prior_cutoff=0.0044):
        super().__init__()
        if kernel_half_size < 0:
            raise ValueError(f"MBRM: kernel_half_size (MODEL.MBRM.KERNEL_HALF_SIZE) must be >= 0, "
                             f"got {kernel_half_size}")
        if gamma < 0:
            raise ValueError(f"MBRM: gamma (MODEL.MBRM.GAMMA) must be >= 0, got {gamma}")
        self.kernel_half_size = kernel_half_size
        self.gamma = gamma
        self.prior_cutoff = prior_cutoff
        if kernel_half_size == len(OFFICIAL_KERNEL) // 2:
            weight, bias = torch.tensor(OFFICIAL_KERNEL), torch.tensor([OFFICIAL_BIAS])
            # Released models without MBRM lack these; the released constants are what they would hold.
            self.reference_checkpoints_lack = ("weight", "bias")
        else:
            weight, bias = torch.zeros(2 * kernel_half_size + 1), torch.zeros(1)
        # Named like the official module's (mbrm.weight (1, 1, 2s+1), mbrm.bias (1,)).
        self.weight = nn.Parameter(weight.view(1, 1, -1))
        self.bias = nn.Parameter(bias)

    @classmethod
    def from_config(cls, cfg):
        check_values(cfg.MODEL.MBRM, "MODEL.MBRM", MBRM_REQUIREMENTS)
        return {"kernel_half_size": cfg.MODEL.MBRM.KERNEL_HALF_SIZE, "gamma": cfg.MODEL.MBRM.GAMMA,
                "prior_cutoff": cfg.MODEL.MBRM.PRIOR_CUTOFF}

    @staticmethod
    def profiles(masks):
        """(N, H, W) soft masks -> x-profiles (N, W) (max over rows), y-profiles (N, H)."""
        if masks.dim() != 3:
            raise ValueError(f"MBRM: masks must be (N, H, W), got shape {tuple(masks.shape)}")
        masks = masks.float()
        if masks.shape[0] == 0 or masks.shape[1] == 0 or masks.shape[2] == 0:
            return masks.new_zeros(masks.shape[0], masks.shape[2]), masks.new_zeros(masks.shape[0], masks.shape[1])
        return masks.amax(dim=1), masks.amax(dim=2)

    def forward(self, masks, boxes):
        """
        Args:
            masks: (N, H, W) soft foreground probabilities in [0, 1], in the boxes' image frame.
            boxes: (N, 4) float XYXY continuous boxes (Detectron2 convention).
        Returns:
            (N, 4) refined boxes (integer edge positions as floats).
        """
        self._check_boxes(boxes, masks.shape[0] if masks.dim() == 3 else None, finite=False)
        x_profiles, y_profiles = self.profiles(masks)
        return self.refine(x_profiles, y_profiles, boxes)

    def refine(self, x_profiles, y_profiles, boxes):
        """Same as ``forward`` from precomputed profiles: x (N, W), y (N, H). Lets callers keep only
        the profiles of large soft masks (bounded memory)."""
        self._check_boxes(boxes, x_profiles.shape[0])
        return self.refine_detections(x_profiles, y_profiles, boxes)

    def refine_detections(self, x_profiles, y_profiles, boxes):
        """``refine`` for a detector's own boxes, which are finite: it skips the check for inf / nan,
        whose device-to-host read would stall a GPU's queue of mask work at the end of inference."""
        self._check_boxes(boxes, x_profiles.shape[0], finite=False)
        if boxes.shape[0] == 0:
            return boxes.clone()
        log_posterior, regressed = self._log_posterior(x_profiles, y_profiles, boxes.float())
        best = log_posterior.argmax(dim=2).to(regressed.dtype)  # first maximum, as the official argmax
        # A fully truncated prior (sigma so large that its peak density is below the cutoff) gives
        # no posterior: keep the regressed side.
        reachable = torch.isfinite(log_posterior.amax(dim=2))
        x_sides, y_sides = torch.where(reachable, best, regressed).chunk(2)  # (N, 2): (x1, x2), (y1, y2)
        return torch.stack([x_sides[:, 0], y_sides[:, 0], x_sides[:, 1], y_sides[:, 1]], dim=1).to(boxes.dtype)

    def loss(self, x_profiles, y_profiles, boxes, gt_boxes):
        """The paper's training loss: cross-entropy of the posterior over edge positions against the
        GT edge (rounded to the nearest position), averaged over the 4N sides.

        Sides whose GT edge lies where the truncated prior is 0 cannot be reached and are left out, as are
        sides whose whole prior is truncated (a box so large that the prior's peak density is below the cutoff).
        Args:
            x_profiles (N, W), y_profiles (N, H): from :meth:`profiles` of the soft masks.
            boxes (N, 4): the detector's boxes; gt_boxes (N, 4): their matched GT boxes.
        Returns:
            scalar loss (0 with a gradient path when nothing is trainable).
        """
        self._check_boxes(boxes, x_profiles.shape[0])
        self._check_boxes(gt_boxes, x_profiles.shape[0])
        no_loss = (self.weight.sum() + self.bias.sum()) * 0.0
        if boxes.shape[0] == 0:
            return no_loss
        log_posterior, _ = self._log_posterior(x_profiles, y_profiles, boxes.float())
        # A row of -inf (whole prior truncated) would make log_softmax, and through it every gradient, nan.
        reachable = torch.isfinite(log_posterior.amax(dim=2))  # (2N, 2)
        log_posterior = F.log_softmax(log_posterior.masked_fill(~reachable[..., None], 0.0), dim=2)
        gt_x_sides, gt_y_sides = self._sides(gt_boxes.float()).round().chunk(2)
        targets = torch.cat([gt_x_sides.clamp(0, x_profiles.shape[1]), gt_y_sides.clamp(0, y_profiles.shape[1])]).long()
        picked = log_posterior.gather(2, targets[..., None])[..., 0]  # (2N, 2)
        nll = -picked[torch.isfinite(picked) & reachable]
        if nll.numel() == 0:
            return no_loss
        return nll.mean()

    def _check_boxes(self, boxes, num_masks, finite=True):
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"MBRM: boxes must be (N, 4), got shape {tuple(boxes.shape)}")
        if num_masks is not None and boxes.shape[0] != num_masks:
            raise ValueError(f"MBRM: {boxes.shape[0]} boxes but {num_masks} masks")
        if finite and not torch.isfinite(boxes).all():
            raise ValueError("MBRM: boxes contain inf or nan")

    @staticmethod
    def _sides(boxes):
        """(N, 4) XYXY -> (2N, 2): rows 0..N-1 the (x1, x2) of each box, rows N..2N-1 its (y1, y2)."""
        return torch.cat([boxes[:, 0::2], boxes[:, 1::2]])

    def _log_posterior(self, x_profiles, y_profiles, boxes):
        """Unnormalised log posterior of the low (left/top) and high (right/bottom) edge over positions
        0..L, both axes in one batch (fewer, larger ops: on a GPU, MBRM at inference is bound by op count).

        Args:
            x_profiles (N, W), y_profiles (N, H); boxes (N, 4) float.
        Returns:
            log posterior (2N, 2, max(W, H) + 1), rows as :meth:`_sides`, -inf where the truncated prior
            is 0 and past the row's axis end; and the regressed sides (2N, 2).
        """
        for name, profiles in (("x", x_profiles), ("y", y_profiles)):
            if profiles.dim() != 2 or profiles.shape[0] != boxes.shape[0]:
                raise ValueError(f"MBRM: {name} profiles must be ({boxes.shape[0]}, L), got shape "
                                 f"{tuple(profiles.shape)}")
        num_boxes, width, height = boxes.shape[0], x_profiles.shape[1], y_profiles.shape[1]
        length = max(width, height)
        # Columns past an axis' end are zeros, i.e. background, as the convolution's padding reads them.
        profiles = torch.cat([p.float() if p.shape[1] == length else F.pad(p.float(), (0, length - p.shape[1]))
                              for p in (x_profiles, y_profiles)])[:, None]
        kernels = torch.cat([self.weight, self.weight.flip(-1)])  # (2, 1, 2s+1): low, high edge detector
        pad = self.kernel_half_size + 1  # one more than 'same': the edges at 0 and L need columns -1 and L
        response = F.conv1d(profiles, kernels, self.bias.expand(2), padding=pad)  # (2N, 2, L + 2)
        # Edge e is scored at column e - 1 (low) and at column e (high); output index j is column j - 1.
        log_likelihood = F.logsigmoid(torch.stack([response[:, 0, : length + 1], response[:, 1, 1:]], dim=1))

        sides = self._sides(boxes)
        positions = torch.arange(length + 1, device=boxes.device, dtype=torch.float32)
        sigma = (self.gamma * (sides[:, 1] - sides[:, 0])).clamp(min=1.0)[:, None, None]  # (2N, 1, 1)
        density = torch.exp(-0.5 * ((positions - sides[..., None]) / sigma) ** 2) / (math.sqrt(2 * math.pi) * sigma)
        log_prior = torch.where(density > self.prior_cutoff, density.log(), -math.inf)
        for rows, end in ((slice(None, num_boxes), width), (slice(num_boxes, None), height)):
            log_prior[rows, :, end + 1:] = -math.inf  # past the axis' end (an empty slice for the longer axis)
        return log_likelihood + log_prior, sides
