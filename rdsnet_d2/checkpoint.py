"""Load checkpoints of the official RDSNet repository (mmdetection v1 names) by renaming on load.

Names are listed in ``tests/reference_keys/rdsnet_keys.tsv``. ResNet and FPN names follow the shared
mmdetection rules (``d2ext.layers.mmdet_resnet_fpn_key``); the heads, the pixel stream, MBRM and the
FPN's extra P6 / P7 convs are RDSNet's own. The official files wrap the state dict as
``{"state_dict": ..., "meta": ...}``; Detectron2's checkpointer needs the bare state dict (a file
``torch.save(ckpt["state_dict"], path)``), see docs/rdsnet_d2.md. Output convolutions are also
reordered per anchor: mmdet v1 numbers a cell's anchors ``ratio_idx * num_sizes + size_idx``, Detectron2
``size_idx * num_ratios + ratio_idx``. Any official key we do not know is an error naming it.
"""
import re

from d2ext.layers import TORCHVISION, check_input_conventions, mmdet_resnet_fpn_key, rename_reference_keys

OFFICIAL_PREFIXES = ("bbox_head.", "mask_head.", "neck.")
# The official neck starts at C3 (mmdet start_level=1): lateral / output conv i is level i + 3.
_FPN_FIRST_LEVEL = 3

# (pattern, replacement) on names without the model prefix; first match wins.
_RULES = [
    # mmdet's extra convs (fpn_convs.3 / .4) are Detectron2's top block, not FPN outputs 6 / 7.
    (r"^neck\.fpn_convs\.3\.conv\.(weight|bias)$", r"backbone.top_block.p6.\1"),
    (r"^neck\.fpn_convs\.4\.conv\.(weight|bias)$", r"backbone.top_block.p7.\1"),
    (r"^bbox_head\.(cls|reg|rep)_convs\.(\d+)\.conv\.weight$",
     lambda m: f"head.{_TOWER[m[1]]}_tower.{m[2]}.weight"),
    (r"^bbox_head\.(cls|reg|rep)_convs\.(\d+)\.gn\.(weight|bias)$",
     lambda m: f"head.{_TOWER[m[1]]}_tower.{m[2]}.norm.{m[3]}"),
    (r"^bbox_head\.retina_(cls|reg|rep)\.(weight|bias)$", lambda m: f"head.{_OUTPUT[m[1]]}.{m[2]}"),
    # mask_head.lateral_convs.<level>.<slot>: even slots are ConvModules, odd ones parameter-free upsamplers.
    (r"^mask_head\.lateral_convs\.(\d)\.(\d)\.conv\.weight$",
     lambda m: f"pixel_stream.level_convs.{m[1]}.{int(m[2]) // 2}.weight"),
    (r"^mask_head\.lateral_convs\.(\d)\.(\d)\.gn\.(weight|bias)$",
     lambda m: f"pixel_stream.level_convs.{m[1]}.{int(m[2]) // 2}.norm.{m[3]}"),
    (r"^mask_head\.final_convs\.0\.0\.conv\.weight$", r"pixel_stream.fuse_conv.weight"),
    (r"^mask_head\.final_convs\.0\.0\.gn\.(weight|bias)$", r"pixel_stream.fuse_conv.norm.\1"),
    (r"^mask_head\.conv_reps\.(weight|bias)$", r"pixel_stream.pixel_rep.\1"),
    (r"^mbrm\.(weight|bias)$", r"mbrm.\1"),
]
_TOWER = {"cls": "cls", "reg": "bbox", "rep": "rep"}
_OUTPUT = {"cls": "cls_score", "reg": "bbox_pred", "rep": "rep_pred"}
_PER_ANCHOR_OUTPUT = re.compile(r"^bbox_head\.retina_(cls|reg|rep)\.(weight|bias)$")
_NUM_BATCHES_TRACKED = "num_batches_tracked"  # BatchNorm's counter: Detectron2's FrozenBN has none


def is_official_rdsnet_state_dict(state_dict, prefix=""):
    return any(k.startswith(prefix + p) for k in state_dict for p in OFFICIAL_PREFIXES)


def official_to_detectron2_name(name):
    """The Detectron2-side name of an official (mmdet v1) parameter name, or None if unknown."""
    for pattern, replacement in _RULES:
        match = re.match(pattern, name)
        if match:
            return replacement(match) if callable(replacement) else match.expand(replacement)
    return mmdet_resnet_fpn_key(name, fpn_first_level=_FPN_FIRST_LEVEL) or None


def reorder_anchors(tensor, num_sizes, num_ratios):
    """Output-conv weight or bias (A * c, ...) from mmdet v1's anchor order to Detectron2's."""
    num_anchors = num_sizes * num_ratios
    if tensor.shape[0] % num_anchors:
        raise ValueError(f"per-anchor output of {tensor.shape[0]} channels is not a multiple of {num_anchors} anchors")
    blocks = tensor.reshape(num_ratios, num_sizes, tensor.shape[0] // num_anchors, *tensor.shape[1:])
    return blocks.transpose(0, 1).reshape(tensor.shape)


def rename_official_rdsnet_keys(model, state_dict, prefix, error_msgs):
    """In place: rename the official keys under ``prefix`` (a no-op for Detectron2-named dicts, whose
    unknown keys stay Detectron2's "unexpected keys" warning).

    ``model`` gives the anchor layout (``official_anchor_layout`` = (num_sizes, num_ratios)). Unknown
    official keys, shape mismatches and a model that takes its input otherwise than the official weights
    expect (torchvision's: ``d2ext.layers.input_convention_mismatches``) go to ``error_msgs``
    (``load_state_dict`` raises them).
    """
    if not is_official_rdsnet_state_dict(state_dict, prefix):
        return
    check_input_conventions(model, TORCHVISION, "official RDSNet", "configs/RDSNet/Base-RDSNet.yaml", error_msgs)
    num_sizes, num_ratios = model.official_anchor_layout
    locals_ = [k[len(prefix):] for k in state_dict if k.startswith(prefix)]
    for local in locals_:
        if _PER_ANCHOR_OUTPUT.match(local):
            state_dict[prefix + local] = reorder_anchors(state_dict[prefix + local], num_sizes, num_ratios)
    ignored = {local for local in locals_ if local.endswith(_NUM_BATCHES_TRACKED)}
    if model.mbrm is None:  # a refine checkpoint loaded without MBRM: its two constants are not needed
        ignored |= {"mbrm.weight", "mbrm.bias"}
    rename_reference_keys(model, state_dict, prefix, official_to_detectron2_name, error_msgs,
                          "official RDSNet", ignored)
