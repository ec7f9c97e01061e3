#!/usr/bin/env python
"""Convert a released checkpoint (AdelaiDet, mmdetection, official RDSNet, Detectron2 model zoo) into a
Detectron2 checkpoint in this repository's parameter names.

    python projects/convert_checkpoint.py --config-file configs/CondInst/MS_R_50_1x.yaml \
        --input CondInst_MS_R_50_1x.pth --output condinst_r50_1x_d2.pth

The model of ``--config-file`` loads ``--input`` through Detectron2's ``DetectionCheckpointer`` (each
model renames the reference names it knows in ``_load_from_state_dict`` and rejects unknown or
mis-shaped keys with an error naming them); the loaded state dict is then saved as ``{"model": ...}``.
"""
import argparse

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from d2ext.engine import setup_cfg


def convert(config_file, input_path, output_path, opts=()):
    cfg = setup_cfg(config_file, ["MODEL.DEVICE", "cpu", *opts])
    model = build_model(cfg)
    incompatible = DetectionCheckpointer(model).load(input_path)
    torch.save({"model": model.state_dict(), "__author__": "d2ext convert_checkpoint"}, output_path)
    return incompatible


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
