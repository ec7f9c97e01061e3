"""Validation of config values against what the built model provides, shared by every method."""


def check_in_features(config_key, in_features, input_shape):
    """Raise a ValueError naming ``config_key`` if a feature of ``in_features`` is not in ``input_shape``
    (the backbone's ``output_shape()``: name -> ShapeSpec)."""
    missing = [f for f in in_features if f not in input_shape]
    if missing:
        raise ValueError(f"{config_key} {missing} are not produced by the backbone "
                         f"(it gives {sorted(input_shape)})")
