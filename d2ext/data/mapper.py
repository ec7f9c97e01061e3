"""Detectron2's DatasetMapper with a check of the polygon annotations that names the offending one, and
errors that name an unreadable image file."""
from detectron2.data import DatasetMapper as D2DatasetMapper

from .image_io import read_image


def check_polygons(dataset_dict):
    """Raise a ValueError naming the image, the annotation and the polygon if a polygon of
    ``dataset_dict["annotations"]`` is not a flat list of at least 3 (x, y) points.

    Detectron2 rasterises polygons with pycocotools, which reads a 4-value polygon as a box and fails
    on shorter or odd-length ones with errors that name neither the image nor the annotation.
    Datasets loaded by ``load_coco_json`` drop such polygons; records made otherwise reach the mapper.
    """
    image = dataset_dict.get("file_name", dataset_dict.get("image_id"))
    for index, annotation in enumerate(dataset_dict.get("annotations", [])):
        segmentation = annotation.get("segmentation")
        if not isinstance(segmentation, list):  # RLE dict or mask array
            continue
        for number, polygon in enumerate(segmentation):
            size = len(polygon)
            if size < 6 or size % 2:
                raise ValueError(f"{image}: annotation {index} (category {annotation.get('category_id')}) has "
                                 f"polygon {number} of {size} coordinates; a polygon needs an even number of "
                                 f"at least 6 (3 x, y points)")


class DatasetMapper(D2DatasetMapper):
    """Detectron2's ``DatasetMapper`` (same config, same outputs) that checks the polygons of each
    training record with :func:`check_polygons` before rasterising them, and whose error for a missing or
    unreadable image file names the file."""

    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except Exception:
            # Detectron2 reads the image with Pillow, whose errors for a damaged file ("image file is
            # truncated") do not name it: when the file is the cause, this read raises an error naming it.
            read_image(dataset_dict["file_name"], self.image_format)
            raise

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        if self.use_instance_mask:
            check_polygons(dataset_dict)
        super()._transform_annotations(dataset_dict, transforms, image_shape)
