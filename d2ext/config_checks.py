"""Validation of config values, shared by every method: against what the built model provides, and against
the range each key allows."""
from typing import Any, Callable, Dict, NamedTuple

from detectron2.layers import get_norm


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


class Requirement(NamedTuple):
    """What a config value must be: ``holds(value)``, and the words an error states it in."""

    holds: Callable[[Any], bool]
    text: str


COUNT = Requirement(lambda v: v >= 1, "an integer >= 1")
COUNT_OR_OFF = Requirement(lambda v: v == -1 or v >= 1, "-1 (off) or an integer >= 1")
NON_NEGATIVE = Requirement(lambda v: v >= 0, ">= 0")
POSITIVE = Requirement(lambda v: v > 0, "> 0")
FRACTION = Requirement(lambda v: 0 <= v <= 1, "in [0, 1]")
PRIOR = Requirement(lambda v: 0 < v < 1, "a probability strictly between 0 and 1")
# fvcore's sigmoid_focal_loss (Detectron2's) weighs classes only for alpha >= 0.
FOCAL_ALPHA = Requirement(lambda v: v <= 1, "in [0, 1], or negative for no class weighting")
NON_EMPTY = Requirement(lambda v: len(v) > 0, "a non-empty list")
POSITIVES = Requirement(lambda v: len(v) > 0 and all(x > 0 for x in v), "a non-empty list of numbers > 0")
COUNTS = Requirement(lambda v: len(v) > 0 and all(x >= 1 for x in v), "a non-empty list of integers >= 1")
INCREASING = Requirement(lambda v: all(x > 0 for x in v) and all(a < b for a, b in zip(v, v[1:])),
                         "a list of increasing numbers > 0")


def one_of(*choices):
    """The requirement that a value is one of ``choices``."""
    return Requirement(lambda v: v in choices, f"one of {choices}")


def check_values(node, prefix, requirements: Dict[str, Requirement]):
    """Raise a ValueError naming the key if a value of the config ``node`` (at ``prefix``, e.g.
    ``"MODEL.FCOS"``) does not meet its requirement; ``requirements``: {key, dotted below the node: ...}.
    A model checks its keys when it is built, before a bad value fails deep inside a tensor op."""
    for key, requirement in requirements.items():
        value = node
        for part in key.split("."):
            value = value[part]
        if not requirement.holds(value):
            raise ValueError(f"{prefix}.{key} must be {requirement.text}, got {value!r}")


def check_norm(config_key, norm, channels: Dict[str, int]):
    """Raise a ValueError naming ``config_key`` unless Detectron2's ``get_norm`` builds ``norm`` for each
    channel count of ``channels`` ({what has them: count}); "GN" is GroupNorm(32, C), so C % 32 == 0."""
    for name, count in channels.items():
        try:
            get_norm(norm, count)
        except KeyError:
            raise ValueError(f"{config_key} {norm!r} is not a norm Detectron2's get_norm knows, such as '' (none), "
                             f"'BN', 'SyncBN', 'FrozenBN' or 'GN'") from None
        except ValueError as e:  # GroupNorm: channels not divisible by the 32 groups
            raise ValueError(f"{config_key} {norm!r} cannot normalise the {count} channels of {name}: {e}") from None
