#!/usr/bin/env python
"""Convert a released checkpoint (AdelaiDet, mmdetection, official RDSNet, Detectron2 model zoo) into a
Detectron2 checkpoint in this repository's parameter names.

    python projects/convert_checkpoint.py --config-file configs/CondInst/MS_R_50_1x.yaml \
        --input CondInst_MS_R_50_1x.pth --output condinst_r50_1x_d2.pth

The model of ``--config-file`` loads ``--input`` through Detectron2's ``DetectionCheckpointer`` (each
model renames the reference names it knows in ``_load_from_state_dict`` and rejects unknown or
mis-shaped keys with an error naming them); the loaded state dict is then saved as ``{"model": ...}``.
mmdetection's ``{"state_dict": ..., "meta": ...}`` files are unwrapped first.
"""
import argparse
import os
import tempfile

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from d2ext.engine import setup_cfg


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


def convert(config_file, input_path, output_path, opts=()):
    cfg = setup_cfg(config_file, ["MODEL.DEVICE", "cpu", *opts])
    model = build_model(cfg)
    with tempfile.TemporaryDirectory() as directory:
        DetectionCheckpointer(model).load(unwrap_mmdet_checkpoint(input_path, directory))
    torch.save({"model": model.state_dict(), "__author__": "d2ext convert_checkpoint"}, output_path)


def main():
    parser = argparse.ArgumentParser(description="Convert a released checkpoint to this repository's names.")
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", required=True, help="released checkpoint (.pth / .pkl)")
    parser.add_argument("--output", required=True, help="converted checkpoint (.pth)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args()
    convert(args.config_file, args.input, args.output, args.opts)
    print("wrote", args.output)


if __name__ == "__main__":
    main()
