"""Load checkpoints of the official RDSNet repository (mmdetection v1 names) by renaming on load.

Names are listed in ``shared/reference/rdsnet_keys.tsv``. The official files wrap the state dict as
``{"state_dict": ..., "meta": ...}``; Detectron2's checkpointer needs the bare state dict (a file
``torch.save(ckpt["state_dict"], path)``), see docs/rdsnet_d2.md. Output convolutions are also
reordered per anchor: mmdet v1 numbers a cell's anchors ``ratio_idx * num_sizes + size_idx``, Detectron2 ``size_idx * num_ratios +
ratio_idx``. Any official-looking key we do not know is an error naming it.
"""
import re

OFFICIAL_PREFIXES = ("bbox_head.", "mask_head.", "neck.")

# (pattern, replacement) on names without the model prefix; first match wins.
_RULES = [
    (r"^backbone\.conv1\.weight$", r"backbone.bottom_up.stem.conv1.weight"),
    (r"^backbone\.bn1\.(weight|bias|running_mean|running_var)$", r"backbone.bottom_up.stem.conv1.norm.\1"),
    (r"^backbone\.layer(\d)\.(\d+)\.conv(\d)\.weight$", lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"),
    (r"^backbone\.layer(\d)\.(\d+)\.bn(\d)\.(weight|bias|running_mean|running_var)$",
     lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"),
    (r"^backbone\.layer(\d)\.0\.downsample\.0\.weight$", lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.0.shortcut.weight"),
    (r"^backbone\.layer(\d)\.0\.downsample\.1\.(weight|bias|running_mean|running_var)$",
     lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.0.shortcut.norm.{m[2]}"),
    (r"^neck\.lateral_convs\.([0-2])\.conv\.(weight|bias)$", lambda m: f"backbone.fpn_lateral{int(m[1]) + 3}.{m[2]}"),
    (r"^neck\.fpn_convs\.([0-2])\.conv\.(weight|bias)$", lambda m: f"backbone.fpn_output{int(m[1]) + 3}.{m[2]}"),
    (r"^neck\.fpn_convs\.3\.conv\.(weight|bias)$", r"backbone.top_block.p6.\1"),
    (r"^neck\.fpn_convs\.4\.conv\.(weight|bias)$", r"backbone.top_block.p7.\1"),
    (r"^bbox_head\.(cls|reg|rep)_convs\.(\d+)\.conv\.weight$",
     lambda m: f"head.{_TOWER[m[1]]}_tower.{m[2]}.weight"),
    (r"^bbox_head\.(cls|reg|rep)_convs\.(\d+)\.gn\.(weight|bias)$",
     lambda m: f"head.{_TOWER[m[1]]}_tower.{m[2]}.norm.{m[3]}"),
    (r"^bbox_head\.retina_cls\.(weight|bias)$", r"head.cls_score.\1"),
    (r"^bbox_head\.retina_reg\.(weight|bias)$", r"head.bbox_pred.\1"),
    (r"^bbox_head\.retina_rep\.(weight|bias)$", r"head.rep_pred.\1"),
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
_PER_ANCHOR_OUTPUTS = ("head.cls_score.", "head.bbox_pred.", "head.rep_pred.")
_IGNORED = re.compile(r"num_batches_tracked$")


def is_official_rdsnet_state_dict(state_dict, prefix=""):
    return any(k.startswith(prefix + p) for k in state_dict for p in OFFICIAL_PREFIXES)


def official_to_detectron2_name(name):
    """The Detectron2-side name of an official (mmdet v1) parameter name, or None if unknown."""
    for pattern, replacement in _RULES:
        match = re.match(pattern, name)
        if match:
            return replacement(match) if callable(replacement) else match.expand(replacement)
    return None


def reorder_anchors(tensor, num_sizes, num_ratios):
    """Output-conv weight or bias (A * c, ...) from mmdet v1's anchor order to Detectron2's."""
    num_anchors = num_sizes * num_ratios
    if tensor.shape[0] % num_anchors:
        raise ValueError(f"per-anchor output of {tensor.shape[0]} channels is not a multiple of {num_anchors} anchors")
    blocks = tensor.reshape(num_ratios, num_sizes, tensor.shape[0] // num_anchors, *tensor.shape[1:])
    return blocks.transpose(0, 1).reshape(tensor.shape)


def rename_official_rdsnet_keys(state_dict, prefix, model):
    """In place: rename the official keys under ``prefix`` (a no-op for Detectron2-named dicts).

    ``model`` gives the anchor layout (``official_anchor_layout`` = (num_sizes, num_ratios)).
    """
    if not is_official_rdsnet_state_dict(state_dict, prefix):
        return
    num_sizes, num_ratios = model.official_anchor_layout
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix):]
        if _IGNORED.search(name):
            del state_dict[key]
            continue
        new_name = official_to_detectron2_name(name)
        if new_name is None:
            raise KeyError(f"official RDSNet checkpoint: unknown parameter '{name}'")
        value = state_dict.pop(key)
        if new_name.startswith(_PER_ANCHOR_OUTPUTS):
            value = reorder_anchors(value, num_sizes, num_ratios)
        state_dict[prefix + new_name] = value
