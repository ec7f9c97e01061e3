#!/usr/bin/env python
"""Run a model on images and write overlay PNGs drawn with Detectron2's Visualizer.

    python projects/demo.py --config-file CFG --input img1.jpg folder/ 'more/*.png' --output out/ \
        --opts MODEL.WEIGHTS output/model_final.pth
    python projects/demo.py --config-file CFG --dataset synthetic_shapes_val --max-images 8 --output out/

Any image Pillow reads is accepted: grey ones are replicated to 3 channels, RGBA loses its alpha and 16-bit
grey (PNG, TIFF) is scaled to 8 bits. An unreadable file stops the demo with an error that names it. The
overlay of ``x.*`` is ``OUTPUT/x.png``; two inputs with one name stem are an error before anything runs.
"""
import argparse
import glob
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger

from d2ext.data.image_io import read_image
from d2ext.engine import setup_cfg
from d2ext.visualization import draw_instance_predictions, save_rgb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def expand_inputs(inputs):
    """Files, folders (their images, sorted) and globs -> list of paths, each once (in the order first given).
    Unknown paths are errors."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item)
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise FileNotFoundError(f"--input folder {item!r} contains no images")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        else:
            found = sorted(glob.glob(item))
            if not found:
                raise FileNotFoundError(f"--input {item!r} is not a file, a folder or a matching glob")
            paths += found
    return list(dict.fromkeys(os.path.normpath(path) for path in paths))


def output_names(paths):
    """The overlay file name of each input: its name with ``.png``. Inputs that would write one file are an error."""
    names = [os.path.splitext(os.path.basename(path))[0] + ".png" for path in paths]
    first_input = {}
    for path, name in zip(paths, names):
        if name in first_input:
            raise ValueError(f"--input {first_input[name]!r} and {path!r} would both be written to {name!r}: "
                             "run the demo on them with different --output folders")
        first_input[name] = path
    return names


def predict_file(predictor, path):
    """Run ``predictor`` (a ``DefaultPredictor``) on one image file -> (its ``Instances``, the image as RGB).

    ``DefaultPredictor`` takes BGR (OpenCV's order) and converts to ``INPUT.FORMAT`` itself, so the file is
    read as BGR whatever the config's format.
    """
    image = read_image(path, "BGR")  # grey, RGBA, 16-bit: 8-bit 3 channels
    return predictor(image)["instances"], image[:, :, ::-1]


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", default=[], help="image files, folders or globs")
    parser.add_argument("--dataset", help="a registered dataset to take the images from instead")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--output", required=True, help="folder for the overlay PNGs")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser


def main(args):
    if bool(args.input) == bool(args.dataset):
        raise SystemExit("give exactly one of --input and --dataset")
    cfg = setup_cfg(args.config_file, args.opts)
    if args.dataset:
        paths = [d["file_name"] for d in DatasetCatalog.get(args.dataset)]
        metadata = MetadataCatalog.get(args.dataset)
    else:
        paths = expand_inputs(args.input)
        metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    paths = paths[: args.max_images]
    names = output_names(paths)
    predictor = DefaultPredictor(cfg)
    os.makedirs(args.output, exist_ok=True)
    written = []
    for path, name in zip(paths, names):
        instances, rgb = predict_file(predictor, path)
        overlay = draw_instance_predictions(rgb, instances, metadata, args.confidence_threshold)
        out = os.path.join(args.output, name)
        save_rgb(out, overlay)
        written.append(out)
        drawn = int((instances.scores >= args.confidence_threshold).sum())
        print(f"{path}: {drawn} of {len(instances)} instances drawn (score >= {args.confidence_threshold}) -> {out}")
    return written


if __name__ == "__main__":
    setup_logger(name="d2ext")
    main(get_parser().parse_args())
