"""Key names of the released SOLO-family checkpoints: mmdetection 3.x (SOLO, Decoupled SOLO, Decoupled SOLO
Light, SOLOv2) and AdelaiDet (SOLOv2), mapped to this package's names. The models apply the mapping on load
(``SOLO._load_from_state_dict``), so ``DetectionCheckpointer(model).load(path)`` reads the files as they are."""
import re

from d2ext.layers import mmdet_resnet_fpn_key

MMDET = "mmdetection"
ADELAIDET = "AdelaiDet"

# mmdetection head prefixes (ConvModule: ``.conv.weight`` + ``.gn.{weight,bias}``) -> ours.
_MMDET_HEAD = [
    (re.compile(r"^mask_head\.mask_convs(_x|_y)?\.(\d+)\."), r"mask_branch.tower\1.\2."),
    (re.compile(r"^mask_head\.conv_mask_list(_x|_y)?\.(\d+)\."), r"mask_branch.predictors\1.\2."),
    (re.compile(r"^mask_head\.cls_convs\.(\d+)\."), r"category_branch.tower.\1."),
    (re.compile(r"^mask_head\.conv_cls\."), "category_branch.predictor."),
    (re.compile(r"^mask_head\.kernel_convs\.(\d+)\."), r"mask_branch.kernel_branch.tower.\1."),
    (re.compile(r"^mask_head\.conv_kernel\."), "mask_branch.kernel_branch.predictor."),
    (re.compile(r"^mask_head\.mask_feature_head\.convs_all_levels\.(\d+)\.conv(\d+)\."),
     r"mask_branch.feature_branch.levels.\1.\2."),
    (re.compile(r"^mask_head\.mask_feature_head\.conv_pred\."), "mask_branch.feature_branch.predictor."),
]
_MMDET_CONV_MODULE = [(re.compile(r"\.conv\.weight$"), ".weight"), (re.compile(r"\.gn\.(weight|bias)$"), r".norm.\1")]

# AdelaiDet SOLOv2: towers are Sequentials of (conv, GN, ReLU) -> indices 3k (conv) and 3k + 1 (GN).
_ADELAIDET_TOWER = re.compile(r"^ins_head\.(cate|kernel)_tower\.(\d+)\.(weight|bias)$")
_ADELAIDET_TOWER_PREFIX = {"cate": "category_branch.tower", "kernel": "mask_branch.kernel_branch.tower"}
_ADELAIDET_OTHER = [
    (re.compile(r"^ins_head\.cate_pred\."), "category_branch.predictor."),
    (re.compile(r"^ins_head\.kernel_pred\."), "mask_branch.kernel_branch.predictor."),
    (re.compile(r"^mask_head\.convs_all_levels\.(\d+)\.conv(\d+)\.0\.weight$"),
     r"mask_branch.feature_branch.levels.\1.\2.weight"),
    (re.compile(r"^mask_head\.convs_all_levels\.(\d+)\.conv(\d+)\.1\.(weight|bias)$"),
     r"mask_branch.feature_branch.levels.\1.\2.norm.\3"),
    (re.compile(r"^mask_head\.conv_pred\.0\.weight$"), "mask_branch.feature_branch.predictor.weight"),
    (re.compile(r"^mask_head\.conv_pred\.1\.(weight|bias)$"), r"mask_branch.feature_branch.predictor.norm.\1"),
]


def reference_format(keys):
    """MMDET, ADELAIDET or None (this package's own names) from a checkpoint's keys."""
    keys = list(keys)
    if any(k.startswith("ins_head.") for k in keys):
        return ADELAIDET
    if any(k.startswith(("neck.", "mask_head.cls_convs.", "backbone.layer1.")) for k in keys):
        return MMDET
    return None


def _rename_mmdet(key):
    backbone_key = mmdet_resnet_fpn_key(key)
    if backbone_key is not None:
        return backbone_key
    for pattern, replacement in _MMDET_HEAD:
        if pattern.match(key):
            key = pattern.sub(replacement, key)
            for suffix, new_suffix in _MMDET_CONV_MODULE:
                key = suffix.sub(new_suffix, key)
            return key
    return None


def _rename_adelaidet(key):
    if key.startswith("backbone."):  # Detectron2's own ResNet-FPN names
        return key
    tower = _ADELAIDET_TOWER.match(key)
    if tower:
        branch, index, param = tower.groups()
        conv, part = divmod(int(index), 3)
        if part == 0 and param == "weight":
            return f"{_ADELAIDET_TOWER_PREFIX[branch]}.{conv}.weight"
        if part == 1:
            return f"{_ADELAIDET_TOWER_PREFIX[branch]}.{conv}.norm.{param}"
        return None
    for pattern, replacement in _ADELAIDET_OTHER:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return None


def rename_reference_key(key, source):
    """This package's name of a ``source`` (MMDET / ADELAIDET) checkpoint key; None if it has none.

    "" means "drop" (BatchNorm ``num_batches_tracked``, absent from Detectron2's FrozenBN).
    """
    if source == MMDET:
        return _rename_mmdet(key)
    if source == ADELAIDET:
        return _rename_adelaidet(key)
    raise ValueError(f"unknown checkpoint source {source!r}")
