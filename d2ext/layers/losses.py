import torch.nn.functional as F


def dice_loss(inputs, targets, eps=1e-5, squared_denominator=True):
    """Dice loss per instance (V-Net form, as used by SOLO, CondInst and BlendMask's references).

    Args:
        inputs: (N, ...) mask probabilities in [0, 1] (apply sigmoid before).
        targets: (N, ...) binary targets, same shape.
        squared_denominator: sum of squares in the denominator (SOLO, CondInst); else plain sums.
    Returns:
        (N,) loss ``1 - 2 * sum(p * t) / (D(p) + D(t))`` per instance.
    """
    if inputs.shape != targets.shape:
        raise ValueError(f"dice_loss: inputs {tuple(inputs.shape)} vs targets {tuple(targets.shape)}")
    inputs = inputs.flatten(1)
    targets = targets.flatten(1).to(inputs.dtype)
    intersection = (inputs * targets).sum(dim=1)
    if squared_denominator:
        denominator = (inputs * inputs).sum(dim=1) + (targets * targets).sum(dim=1)
    else:
        denominator = inputs.sum(dim=1) + targets.sum(dim=1)
    return 1.0 - 2.0 * intersection / (denominator + eps)


def focal_loss_targets(labels, num_classes):
    """Targets of a sigmoid focal loss over ``num_classes`` classes from integer labels in [0, num_classes],
    ``num_classes`` meaning background: (...) int64 -> (..., num_classes) 0/1 int64, all zeros for background."""
    return F.one_hot(labels, num_classes + 1)[..., :num_classes]
