"""Validation of config values against what the built model provides, shared by every method."""


def check_in_features(config_key, in_features, input_shape):
    """Raise a ValueError naming ``config_key`` if a feature of ``in_features`` is not in ``input_shape``
    (the backbone's ``output_shape()``: name -> ShapeSpec)."""
    missing = [f for f in in_features if f not in input_shape]
    if missing:
        raise ValueError(f"{config_key} {missing} are not produced by the backbone "
                         f"(it gives {sorted(input_shape)})")


def check_every_feature_read(input_shape, readers, hint):
    """Raise a ValueError if a feature of ``input_shape`` (the backbone's ``output_shape()``) is read by none of
    ``readers`` ({config key: features it reads}): its parameters would get no gradient, which Detectron2's
    DistributedDataParallel (``find_unused_parameters=False``) rejects in the middle of training. ``hint`` says
    which key stops the backbone from computing it."""
    read = {f for features in readers.values() for f in features}
    unread = sorted(set(input_shape) - read, key=lambda f: input_shape[f].stride)
    if unread:
        keys = " or ".join(f"{key} {list(features)}" for key, features in readers.items())
        raise ValueError(f"the backbone computes {unread}, which no head reads ({keys}); {hint}")
