#!/usr/bin/env python
"""Convert a released checkpoint (AdelaiDet, mmdetection, official RDSNet, Detectron2 model zoo) into a
Detectron2 checkpoint in this repository's parameter names.

    python projects/convert_checkpoint.py --config-file configs/CondInst/MS_R_50_1x.yaml \
        --input CondInst_MS_R_50_1x.pth --output condinst_r50_1x_d2.pth

The model of ``--config-file`` loads ``--input`` through Detectron2's ``DetectionCheckpointer`` (each
model renames the reference names it knows in ``_load_from_state_dict`` and rejects unknown or
mis-shaped keys with an error naming them); the loaded state dict is then saved as ``{"model": ...}``.
mmdetection's ``{"state_dict": ..., "meta": ...}`` files are unwrapped first. A parameter or buffer of the
model that the checkpoint does not hold is an error, since the output would carry its random initialisation
as if converted (except those whose initial values are the released ones, such as MBRM's constants:
``d2ext.layers.keys_reference_checkpoints_lack``); ``--allow-missing`` converts anyway (e.g. a plain Mask
R-CNN into an NL-RoI model, whose new parameters start at zero), listing what kept its initialisation.
"""
import argparse
import os
import tempfile

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from d2ext.engine import setup_cfg
from d2ext.layers import keys_reference_checkpoints_lack


def unwrap_mmdet_checkpoint(input_path, directory):
    """mmdetection saves ``{"state_dict": ..., "meta": ...}``, which Detectron2's checkpointer rejects;
    return the path of a ``{"model": state_dict}`` copy for those, else ``input_path`` unchanged."""
    if not input_path.endswith((".pth", ".pt")):
        return input_path  # .pkl: Detectron2 / Caffe2 formats, read by DetectionCheckpointer itself
    checkpoint = torch.load(input_path, map_location="cpu", weights_only=False)
    if not (isinstance(checkpoint, dict) and "state_dict" in checkpoint and "model" not in checkpoint):
        return input_path
    path = os.path.join(directory, "unwrapped.pth")
    torch.save({"model": checkpoint["state_dict"]}, path)
    return path


def convert(config_file, input_path, output_path, opts=(), allow_missing=False):
    """Returns the names of the model's parameters and buffers that ``input_path`` did not hold."""
    cfg = setup_cfg(config_file, ["MODEL.DEVICE", "cpu", *opts])
    model = build_model(cfg)
    missing = []
    # DetectionCheckpointer loads with strict=False and only logs what the checkpoint lacks.
    hook = model.register_load_state_dict_post_hook(lambda module, keys: missing.extend(keys.missing_keys))
    with tempfile.TemporaryDirectory() as directory:
        DetectionCheckpointer(model).load(unwrap_mmdet_checkpoint(input_path, directory))
    hook.remove()
    lacking_in_releases = keys_reference_checkpoints_lack(model)
    missing = [key for key in missing if key not in lacking_in_releases]
    if missing and not allow_missing:
        raise ValueError(f"{input_path} does not hold {len(missing)} of the parameters and buffers of the model of "
                         f"{config_file}: {missing}. Is it the checkpoint of that model? --allow-missing converts "
                         "anyway, leaving them at their initialisation")
    torch.save({"model": model.state_dict(), "__author__": "d2ext convert_checkpoint"}, output_path)
    return missing


def main():
    parser = argparse.ArgumentParser(description="Convert a released checkpoint to this repository's names.")
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", required=True, help="released checkpoint (.pth / .pkl)")
    parser.add_argument("--output", required=True, help="converted checkpoint (.pth)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="convert even if the checkpoint lacks some of the model's parameters or buffers")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args()
    missing = convert(args.config_file, args.input, args.output, args.opts, args.allow_missing)
    if missing:
        print(f"kept their initialisation (not in {args.input}): {missing}")
    print("wrote", args.output)


if __name__ == "__main__":
    main()
