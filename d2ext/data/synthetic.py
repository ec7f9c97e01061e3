"""Deterministic synthetic instance-segmentation images ("synthetic shapes").

Every image is generated from ``(seed, index)`` alone, so a split is reproducible on any machine. Scenes
are built to exercise what the methods of this repository are about:

* four classes told apart by shape only (colours are random per instance): ``disk``, ``ring`` (a hole),
  ``ell`` (an L-shape) and ``crescent`` -- three of them non-convex;
* crowded clusters of the same class that touch and overlap (NL-RoI's motivation; tight boxes for
  RDSNet), with occlusion: an instance's mask is its *visible* part, and a new instance is never allowed
  to hide more than 30 % of an earlier one (so every instance stays recognisable);
* objects from 20 px to about 70 % of the short side across, on textured, noisy backgrounds; image
  sizes vary. Every shape lies whole inside its image: a shape cut by the border can lose what
  defines its class (half a ring is a crescent), which would make the labels ambiguous.

Masks are exported as COCO polygons (holes kept by a zero-width "keyhole" cut joining each hole to its
outer contour) or as COCO RLE; both encode the same pixels. Boxes are the tight boxes of those pixels.
"""
import json
import os
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import pycocotools.mask as mask_util

# Bump when the generator changes what it draws: cached splits are keyed by it.
GENERATOR_VERSION = 5
CLASS_NAMES = ("disk", "ring", "ell", "crescent")


@dataclass(frozen=True)
class SyntheticShapesSpec:
    """What to generate. Two specs that are equal generate the same images and annotations."""

    num_images: int
    seed: int
    min_side: int = 192  # image height and width are drawn independently from [min_side, max_side]
    max_side: int = 320
    max_instances: int = 8
    min_radius: float = 10.0  # pixels; below ~10 px the four shapes are hard to tell apart
    max_hidden: float = 0.3  # the largest fraction of an instance that later ones may hide
    min_visible_area: int = 30  # pixels; smaller visible parts are not annotated (and not drawn)

    def key(self):
        """Name of the split's cache folder: the generator version and every field, so that specs that
        differ never share (and silently reuse) a cache."""
        return (f"v{GENERATOR_VERSION}_seed{self.seed}_n{self.num_images}_{self.min_side}-{self.max_side}_"
                f"k{self.max_instances}_r{self.min_radius:g}_h{self.max_hidden:g}_a{self.min_visible_area}")


def _shape_mask(class_name, center, radius, angle, rng, height, width):
    """Full (unoccluded) uint8 mask of one shape. ``radius`` is its half-extent in pixels."""
    mask = np.zeros((height, width), np.uint8)
    cx, cy = center
    if class_name in ("disk", "ring", "crescent"):
        cv2.circle(mask, (int(round(cx)), int(round(cy))), int(round(radius)), 1, -1)
        if class_name == "ring":
            inner = radius * rng.uniform(0.45, 0.65)
            cv2.circle(mask, (int(round(cx)), int(round(cy))), int(round(inner)), 0, -1)
        elif class_name == "crescent":
            shift = radius * rng.uniform(0.45, 0.65)
            bite = (cx + shift * np.cos(angle), cy + shift * np.sin(angle))
            cut_radius = radius * rng.uniform(0.8, 0.95)
            cv2.circle(mask, (int(round(bite[0])), int(round(bite[1]))), int(round(cut_radius)), 0, -1)
    elif class_name == "ell":
        arm = rng.uniform(0.4, 0.5)  # arm thickness relative to the side
        side = 2 * radius
        t = arm * side
        corners = np.array([[0, 0], [side, 0], [side, t], [t, t], [t, side], [0, side]], np.float64)
        corners -= side / 2
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        pts = corners @ rot.T + np.array([cx, cy])
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    else:
        raise ValueError(f"unknown synthetic class {class_name!r}")
    return mask


def _background(rng, height, width):
    """Textured, noisy background: a colour gradient, blurred blotches and stripes."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(40, 200, size=(2, 3)).astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(direction) * xs / width + np.sin(direction) * ys / height + 1) / 2
    img = c0 + (c1 - c0) * ramp[..., None]
    blotches = cv2.GaussianBlur(rng.normal(0, 25, (height, width, 3)).astype(np.float32), (0, 0), 6)
    img += blotches
    period = rng.uniform(8, 24)
    stripes = 12 * np.sin(2 * np.pi * (xs * np.cos(direction) - ys * np.sin(direction)) / period)
    img += stripes[..., None] * rng.uniform(0, 1)
    return img


def _instance_layout(rng, height, width, min_radius):
    """Yield (class_name, center, radius, angle) proposals: singles and same-class clusters."""
    short = min(height, width)
    while True:
        class_name = CLASS_NAMES[rng.integers(len(CLASS_NAMES))]
        radius = float(np.exp(rng.uniform(np.log(min_radius), np.log(0.35 * short))))
        center = rng.uniform([radius, radius], [width - radius, height - radius])
        if rng.uniform() < 0.4:  # a crowded cluster of one class: touching and overlapping neighbours
            for _ in range(int(rng.integers(2, 5))):
                yield class_name, tuple(center), radius, rng.uniform(0, 2 * np.pi)
                step = radius * rng.uniform(1.5, 2.1)
                theta = rng.uniform(0, 2 * np.pi)
                center = center + step * np.array([np.cos(theta), np.sin(theta)])
                radius *= rng.uniform(0.85, 1.15)
        else:
            yield class_name, tuple(center), radius, rng.uniform(0, 2 * np.pi)


def _keyhole(outer, holes):
    """Join holes to their outer contour with zero-width cuts, giving one polygon with holes."""
    poly = [tuple(p) for p in outer]
    for hole in holes:
        hole = [tuple(p) for p in hole]
        dist = np.linalg.norm(np.asarray(poly)[:, None, :] - np.asarray(hole)[None, :, :], axis=2)
        a, b = np.unravel_index(np.argmin(dist), dist.shape)
        poly = poly[: a + 1] + hole[b:] + hole[: b + 1] + poly[a:]
    return poly


def mask_to_polygons(mask, upsample=4):
    """Binary mask (H, W) -> COCO polygons (list of flat [x0, y0, x1, y1, ...]), holes as keyholes.

    Contours run through the centres of boundary pixels, i.e. half a pixel inside the mask's true
    boundary, and a rasteriser would drop those pixels. Tracing the mask upsampled ``upsample`` times
    puts the polygon ``0.5 / upsample`` px inside the boundary instead, so it decodes to the same pixels.
    The traced pixel staircases are then simplified by at most half a pixel (Douglas-Peucker), which
    changes under 1 % of the pixels (at the boundary) and halves the vertices: rasterising polygon
    mask targets in training costs time per vertex. Dataset annotations are what the polygons encode.
    """
    big = cv2.resize(mask.astype(np.uint8), None, fx=upsample, fy=upsample,
                     interpolation=cv2.INTER_NEAREST)
    contours, hierarchy = cv2.findContours(big, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]
    contours = [cv2.approxPolyDP(c, 0.5 * upsample, True) for c in contours]
    polygons = []
    for i, contour in enumerate(contours):
        if hierarchy[i][3] != -1:  # a hole: handled with its parent
            continue
        holes = [contours[j][:, 0, :] for j in range(len(contours))
                 if hierarchy[j][3] == i and len(contours[j]) >= 3]
        poly = _keyhole(contour[:, 0, :], holes)
        if len(poly) < 3:
            continue
        # Fine pixel index k -> its centre (k + 0.5) in COCO's continuous coordinates of the fine grid
        # (pixel (i, j) covers [j, j+1] x [i, i+1]), divided back to the original grid.
        polygons.append([(float(c) + 0.5) / upsample for p in poly for c in p])
    return polygons


def polygons_area_mask(polygons, height, width):
    rles = mask_util.frPyObjects(polygons, height, width)
    return mask_util.decode(mask_util.merge(rles)).astype(bool)


def mask_to_box(mask):
    """Tight XYXY box (continuous coordinates) of a non-empty binary mask."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _touches_border(mask):
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def generate_image(spec, index):
    """Generate one image. Returns (RGB uint8 image, list of annotations with polygons)."""
    rng = np.random.default_rng([spec.seed, index])
    height = int(rng.integers(spec.min_side, spec.max_side + 1))
    width = int(rng.integers(spec.min_side, spec.max_side + 1))
    num_target = int(rng.integers(1, spec.max_instances + 1))

    full_masks, visible, classes = [], [], []
    layout = _instance_layout(rng, height, width, spec.min_radius)
    for _ in range(num_target * 4):  # bounded number of proposals
        if len(full_masks) == num_target:
            break
        class_name, center, radius, angle = next(layout)
        mask = _shape_mask(class_name, center, radius, angle, rng, height, width).astype(bool)
        if mask.sum() < spec.min_visible_area or _touches_border(mask):
            continue
        # Reject a proposal that would hide too much of an earlier instance.
        remaining = [v & ~mask for v in visible]
        if any(r.sum() < (1 - spec.max_hidden) * f.sum() or r.sum() < spec.min_visible_area
               for r, f in zip(remaining, full_masks)):
            continue
        visible = remaining + [mask]
        full_masks.append(mask)
        classes.append(CLASS_NAMES.index(class_name))

    img = _background(rng, height, width)
    for mask in full_masks:  # later instances are drawn on top: they occlude earlier ones
        color = rng.uniform(0, 255, size=3).astype(np.float32)
        texture = rng.normal(0, 12, (height, width, 1)).astype(np.float32)
        img[mask] = (color + texture[mask])
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)

    annotations = []
    for mask, category_id in zip(visible, classes):
        polygons = mask_to_polygons(mask)
        if not polygons:
            continue
        gt = polygons_area_mask(polygons, height, width)  # the annotation is what the polygons encode
        if gt.sum() < spec.min_visible_area:
            continue
        annotations.append({"category_id": category_id, "segmentation": polygons,
                            "bbox": mask_to_box(gt), "area": float(gt.sum())})
    return img, annotations


def _polygons_to_rle(polygons, height, width):
    rle = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _generate_split(spec, directory):
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    records = []
    for index in range(spec.num_images):
        img, annotations = generate_image(spec, index)
        file_name = os.path.join("images", f"{index:05d}.png")
        _write_png_atomic(img, os.path.join(directory, file_name))
        records.append({"file_name": file_name, "image_id": index, "height": img.shape[0],
                        "width": img.shape[1], "annotations": annotations})
    return records


def _write_atomic(data: bytes, path):
    # Another process generating the same split (DDP workers, parallel jobs on a fresh cache) may be
    # reading this file: replace it whole, never truncate it in place (a reader would get half a file).
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_png_atomic(rgb, path):
    ok, png = cv2.imencode(".png", rgb[:, :, ::-1])
    if not ok:
        raise RuntimeError(f"cv2 could not encode synthetic image {path}")
    _write_atomic(png.tobytes(), path)


def _write_json_atomic(obj, path):
    _write_atomic(json.dumps(obj).encode(), path)


def default_cache_root():
    return os.environ.get("D2EXT_DATA", os.path.join(os.path.expanduser("~"), ".cache", "d2ext"))


def split_directory(spec, cache_root=None):
    return os.path.join(cache_root or default_cache_root(), "synthetic_shapes", spec.key())


def ensure_split(spec, cache_root=None):
    """Generate ``spec`` into the cache once; return its folder (images/, annotations.json, coco.json)."""
    directory = split_directory(spec, cache_root)
    manifest = os.path.join(directory, "annotations.json")
    if not os.path.exists(manifest):
        records = _generate_split(spec, directory)
        # Written last and atomically: its presence means the split is complete (also across
        # processes that generate the same split concurrently; their images are identical).
        _write_json_atomic(to_coco_dict(records, directory), os.path.join(directory, "coco.json"))
        _write_json_atomic({"spec": asdict(spec), "records": records}, manifest)
    return directory


def to_coco_dict(records, directory):
    """COCO instances dict (polygon segmentations) of a generated split, for COCOEvaluator."""
    images, annotations = [], []
    for rec in records:
        images.append({"id": rec["image_id"], "file_name": os.path.join(directory, rec["file_name"]),
                       "height": rec["height"], "width": rec["width"]})
        for ann in rec["annotations"]:
            x0, y0, x1, y1 = ann["bbox"]
            annotations.append({"id": len(annotations) + 1, "image_id": rec["image_id"],
                                "category_id": ann["category_id"] + 1,
                                "segmentation": ann["segmentation"], "area": ann["area"],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASS_NAMES)]
    return {"info": {"description": "d2ext synthetic shapes"}, "images": images,
            "annotations": annotations, "categories": categories}


def load_split(spec, mask_format="polygon", cache_root=None):
    """Detectron2 dataset dicts of a split (generated on first use).

    ``mask_format``: ``"polygon"`` (COCO polygons) or ``"rle"`` (COCO RLE dicts, for
    ``INPUT.MASK_FORMAT: bitmask``). Category ids are contiguous 0..3.
    """
    from detectron2.structures import BoxMode

    if mask_format not in ("polygon", "rle"):
        raise ValueError(f"mask_format must be 'polygon' or 'rle', got {mask_format!r}")
    directory = ensure_split(spec, cache_root)
    with open(os.path.join(directory, "annotations.json")) as f:
        records = json.load(f)["records"]
    dicts = []
    for rec in records:
        annotations = []
        for ann in rec["annotations"]:
            segmentation = ann["segmentation"]
            if mask_format == "rle":
                segmentation = _polygons_to_rle(segmentation, rec["height"], rec["width"])
            annotations.append({"bbox": ann["bbox"], "bbox_mode": BoxMode.XYXY_ABS,
                                "category_id": ann["category_id"], "segmentation": segmentation,
                                "iscrowd": 0})
        dicts.append({"file_name": os.path.join(directory, rec["file_name"]),
                      "image_id": rec["image_id"], "height": rec["height"], "width": rec["width"],
                      "annotations": annotations})
    return dicts
