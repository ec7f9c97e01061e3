"""Overlay pictures of predictions with Detectron2's Visualizer."""
import os

import cv2
from detectron2.utils.visualizer import ColorMode, Visualizer


def draw_instance_predictions(image_rgb, instances, metadata, score_threshold=0.5):
    """RGB uint8 (H, W, 3) + ``Instances`` (on any device) -> RGB uint8 overlay."""
    instances = instances.to("cpu")
    instances = instances[instances.scores >= score_threshold]
    visualizer = Visualizer(image_rgb, metadata, instance_mode=ColorMode.IMAGE)
    return visualizer.draw_instance_predictions(instances).get_image()


def save_rgb(path, image_rgb):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not cv2.imwrite(path, image_rgb[:, :, ::-1]):
        raise OSError(f"could not write {path}")
