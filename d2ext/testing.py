"""Helpers for the tests of every package: tiny models from YAML, batches of the built-in data,
train steps, inference, checkpoint round trips, fake reference checkpoints and short overfitting runs.
No network, CPU only."""
import copy
import importlib.util
import os
import re

import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, build_detection_train_loader
from detectron2.data import transforms as T
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import HookBase
from detectron2.layers.mask_ops import _do_paste_mask
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from .data.mapper import DatasetMapper
from .engine import Trainer
from .engine.config import setup_cfg
from .layers import aligned_bilinear

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Key names and shapes of the released checkpoints (AdelaiDet, mmdetection, official RDSNet), as
# tab-separated lists: the checkpoint-loading tests build fake state dicts from them.
REFERENCE_DIR = os.path.join(REPO_ROOT, "tests", "reference_keys")


def load_script(relative):
    """The module of a script of the repository (``projects/*.py``, ``benchmarks/*.py``: not packages), by path."""
    name = os.path.splitext(os.path.basename(relative))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, relative))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_path(relative):
    """Absolute path of a YAML under the repository's ``configs/``."""
    return os.path.join(REPO_ROOT, "configs", relative)


def tiny_cfg(config_file, opts=(), freeze=True):
    """A config on CPU with tests-sized settings layered on top of ``config_file``."""
    return setup_cfg(config_file, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts], freeze=freeze)


def build_tiny_model(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg)


def visible_blendmask_masks(model):
    """Give a randomly initialised BlendMask masks that mask checks can see, in place; returns the model.

    Random weights regress box distances near 0 (boxes of a few pixels) and blend negative mask logits,
    so every pasted mask would be empty. A box-regression bias of 1 gives boxes about two strides wide,
    and bases' biases of alternating sign leave each pixel to the attentions: masks fill part of their box.
    """
    torch.nn.init.constant_(model.proposal_generator.fcos_head.bbox_pred.bias, 1.0)
    predictor = model.basis_module.tower[-1]
    with torch.no_grad():
        predictor.bias.copy_(torch.tensor([2.0 * (-1) ** k for k in range(predictor.out_channels)]))
    return model


def dataset_batch(cfg, dataset_name="synthetic_shapes_mini_train", indices=(0, 1), is_train=True):
    """Mapped inputs (list of dicts, as a data loader yields them) for the given dataset records.

    Training-time mapping is made deterministic by using the test-time resize (no random flip).
    """
    dicts = DatasetCatalog.get(dataset_name)
    return map_records(cfg, [dicts[i] for i in indices], is_train)


def train_step(model, batch, optimizer=None):
    """One training iteration; returns the dict of loss values (floats)."""
    model.train()
    with EventStorage():
        losses = model(batch)
        total = sum(losses.values())
        if optimizer is not None:
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
        else:
            total.backward()
    return {k: float(v) for k, v in losses.items()}


def loss_history(model, batch, iterations, lr=0.01, momentum=0.9):
    """Train on one fixed batch with SGD; returns the loss dicts (floats) of every iteration."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return [train_step(model, batch, optimizer) for _ in range(iterations)]


def overfit(model, batch, iterations, lr=0.01, momentum=0.9):
    """Train on one fixed batch; returns the list of total losses (a learning check)."""
    return [sum(losses.values()) for losses in loss_history(model, batch, iterations, lr, momentum)]


LAST_ITERATIONS = 3  # assert_losses_fall compares their mean with the first iteration


def assert_losses_fall(history, total_factor, **loss_factors):
    """``history``: loss dicts of successive iterations (``loss_history``). The total loss of the last iterations
    (their mean) is below ``total_factor`` x the first, and each named loss below its factor x its first value.
    The mean of the last ``LAST_ITERATIONS``, not the last alone: SGD with momentum on one fixed batch oscillates
    (RDSNetFCOS's loss_mask went 0.23, 0.38, 0.54 over its last three steps while falling from 0.68), and a change
    of float summation order moves where those spikes land."""
    first, tail = history[0], history[-LAST_ITERATIONS:]
    last = {name: sum(h[name] for h in tail) / len(tail) for name in first}
    assert sum(last.values()) < total_factor * sum(first.values()), history
    for name, factor in loss_factors.items():
        assert last[name] < factor * first[name], [h[name] for h in history]


def predict(model, cfg, indices=(0,)):
    """Inference in eval mode on the test-time mapped records ``indices`` of ``dataset_batch``'s dataset.

    Returns:
        (inputs, instances): the mapped inputs and each image's ``Instances``, checked to be at the
        input's original size (``height`` x ``width``).
    """
    inputs = dataset_batch(cfg, is_train=False, indices=indices)
    model.eval()
    with torch.no_grad():
        instances = [out["instances"] for out in model(inputs)]
    for inp, inst in zip(inputs, instances):
        assert inst.image_size == (inp["height"], inp["width"])
    return inputs, instances


def assert_same_model(model, other, cfg, fields=("scores",)):
    """Equal state dicts (names and values), and equal predictions on the first image in ``fields``
    (``pred_boxes`` compares its tensor), with at least one detection; with ``pred_masks`` among them, the
    masks compared must have pixels."""
    ours, theirs = model.state_dict(), other.state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert torch.equal(value, theirs[name]), name
    a, b = predict(model, cfg)[1][0], predict(other, cfg)[1][0]
    assert len(a) > 0
    if "pred_masks" in fields:
        assert a.pred_masks.any(), "the masks compared are empty"
    for field in fields:
        value_a, value_b = a.get(field), b.get(field)
        assert torch.equal(getattr(value_a, "tensor", value_a), getattr(value_b, "tensor", value_b)), field


def checkpoint_round_trip(model, cfg, directory):
    """Save ``model`` with DetectionCheckpointer into ``directory`` and load it into a new model.

    Returns the new model; the caller compares state dicts and outputs.
    """
    DetectionCheckpointer(model, save_dir=directory).save("round_trip")
    other = build_tiny_model(cfg, seed=1)  # another init, so that loading must overwrite it
    DetectionCheckpointer(other).load(os.path.join(directory, "round_trip.pth"))
    return other


def assert_checkpoint_round_trip(cfg, directory, fields=("scores",), prepare=None):
    """Train a tiny model one step (BN statistics leave their init), save it and load it into a newly
    initialised model (``checkpoint_round_trip``), then ``assert_same_model`` on ``fields``.

    Args:
        prepare: ``f(model)`` applied to the model after it is built (e.g. :func:`visible_blendmask_masks`).
    """
    model = build_tiny_model(cfg)
    if prepare is not None:
        prepare(model)
    train_step(model, dataset_batch(cfg))
    assert_same_model(model, checkpoint_round_trip(model.eval(), cfg, directory), cfg, fields)


def read_reference_keys(relative):
    """A reference key list under ``REFERENCE_DIR``: tab-separated name, shape ("(256, 3, 3, 3)") and
    optionally dtype; "#" lines and a "name" header are skipped.

    Returns:
        list of (name, shape tuple, dtype or None).
    """
    path = os.path.join(REFERENCE_DIR, relative)
    if not os.path.exists(path):
        raise FileNotFoundError(f"reference key list {path} is missing")
    entries = []
    with open(path) as f:
        for line in f:
            if line.startswith(("#", "name")) or not line.strip():
                continue
            name, shape, *rest = line.rstrip("\n").split("\t")
            entries.append((name, tuple(int(s) for s in re.findall(r"\d+", shape)), rest[0] if rest else None))
    return entries


def random_weight(name, shape):
    """A fake checkpoint value: positive where a real one must be (BN ``running_var``, FCOS ``scale``)."""
    if name.endswith(("running_var", ".scale")):
        return torch.rand(shape) + 0.5
    return torch.randn(shape) * 0.1


def fake_bottom_up_state(model):
    """Random ``random_weight`` values for the ResNet keys of ``model`` (``backbone.bottom_up.*``, Detectron2's
    names, which reference checkpoints in Detectron2 format share); integer buffers are copied."""
    return {name: random_weight(name, value.shape) if value.is_floating_point() else value.clone()
            for name, value in model.state_dict().items() if name.startswith("backbone.bottom_up.")}


def assert_instance_predictions(instances, height, width):
    """Non-empty predictions formatted like Detectron2's Mask R-CNN at the original image size:
    ``pred_boxes``, ``scores``, ``pred_classes`` and boolean ``pred_masks`` (N, height, width)."""
    assert len(instances) > 0
    assert_prediction_fields(instances, height, width)


def box_iou_reference(a, b):
    """IoU of two XYXY boxes given as sequences of 4 numbers, by hand (0 when the union is empty)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def bilinear_resize_reference(x, size):
    """Loop reference of a bilinear resize with half-pixel centres (``align_corners=False``): (H, W) ->
    ``size`` = (h, w); output pixel p samples the input at (p + 0.5) * H / h - 0.5, clamped to the map."""
    height, width = x.shape

    def source(p, extent, out_extent):
        s = min(max((p + 0.5) * extent / out_extent - 0.5, 0.0), extent - 1)
        i0 = int(s)
        return i0, min(i0 + 1, extent - 1), s - i0

    out = torch.zeros(size)
    for p in range(size[0]):
        i0, i1, a = source(p, height, size[0])
        for q in range(size[1]):
            j0, j1, b = source(q, width, size[1])
            out[p, q] = ((1 - a) * (1 - b) * x[i0, j0] + (1 - a) * b * x[i0, j1]
                         + a * (1 - b) * x[i1, j0] + a * b * x[i1, j1])
    return out


def soft_paste_reference(roi_masks, boxes, image_size):
    """Detectron2's soft pasting over the whole image as it runs on GPU (``paste_masks_in_image`` with
    threshold -1 pastes whole-image chunks there; on CPU it samples only the box grown by 1 px): (N, H, W)
    quantised to steps of 1/255."""
    pasted, _ = _do_paste_mask(roi_masks[:, None], boxes, *image_size, skip_empty=False)
    return (pasted * 255).to(torch.uint8).float() / 255


def resized_detections_reference(raw, height, width):
    """A reference post-processing of one image's input-size detections with full-image soft masks: boxes
    scaled to the output size and clipped, detections with an empty box dropped; soft masks resized to the
    output size.

    Returns:
        boxes (N, 4), soft masks (N, height, width).
    """
    boxes = Boxes(raw.pred_boxes.tensor * torch.tensor([width / raw.image_size[1], height / raw.image_size[0]] * 2))
    boxes.clip((height, width))
    keep = boxes.nonempty()
    soft = F.interpolate(raw.pred_masks[keep][:, None], size=(height, width), mode="bilinear", align_corners=False)
    return boxes.tensor[keep], soft[:, 0]


def condinst_masks_at_input_size(raw, stride):
    """CondInst's raw masks are at the mask output stride over the padded input: AdelaiDet's aligned
    upsampling to the padded input, then the crop to the input image."""
    height, width = raw.image_size
    masks = aligned_bilinear(raw.pred_masks[:, None], stride)[:, 0, :height, :width]
    return Instances(raw.image_size, pred_boxes=raw.pred_boxes, pred_masks=masks)


def assert_masks_inside_expanded_boxes(instances, expand):
    """Every ``pred_masks`` lies inside its ``pred_boxes`` grown by ``expand`` x (size + 1) per side, at
    least 1 px (RDSNet's test crop), on both axes; the low side is compared after flooring, for the
    resize to the original size."""
    for box, mask in zip(instances.pred_boxes.tensor, instances.pred_masks):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if xs.numel() == 0:
            continue
        for coords, lo, hi in ((xs, box[0], box[2]), (ys, box[1], box[3])):
            pad = max(float(expand * (hi - lo + 1)), 1.0)
            assert coords.min() >= int(max(lo - pad, 0)) and coords.max() < hi + pad, \
                (box, coords.min(), coords.max())


def map_records(cfg, records, is_train=True):
    """Map dataset records (Detectron2 dataset dicts, e.g. edited copies of a split's) with the mapper of
    ``d2ext.engine.Trainer``'s loader, made deterministic with the test-time resize (no random flip);
    annotations kept when ``is_train``. Returns the list of inputs."""
    mapper = DatasetMapper(cfg, is_train=False)
    mapper.is_train = is_train  # keep annotations; augmentation stays the deterministic test resize
    return [mapper(copy.deepcopy(record)) for record in records]


def assert_prediction_fields(instances, height, width, masks=True):
    """Predictions of any length (also none) formatted like Detectron2's at the original image size:
    ``pred_boxes`` (N, 4), ``scores`` (N,), ``pred_classes`` (N,) and, when ``masks``, boolean
    ``pred_masks`` (N, height, width)."""
    n = len(instances)
    assert instances.image_size == (height, width)
    assert instances.pred_boxes.tensor.shape == (n, 4)
    assert instances.scores.shape == (n,)
    assert instances.pred_classes.shape == (n,) and instances.pred_classes.dtype == torch.int64
    if masks:
        assert instances.pred_masks.shape == (n, height, width)
        assert instances.pred_masks.dtype == torch.bool


class DeterministicDataTrainer(Trainer):
    """``d2ext.engine.Trainer`` whose training data are the same in every run and in any number of processes.

    The data are the first ``num_images`` records of ``cfg.DATASETS.TRAIN[0]`` in order, cycled: Detectron2's
    ``TrainingSampler`` without shuffling, which shards them over W processes as it does a shuffled stream
    (at step k the processes together get records k * IMS_PER_BATCH ... (k + 1) * IMS_PER_BATCH - 1, process r
    every W-th of them from r). Every image is resized to ``size`` x ``size`` without random augmentation:
    with one image size a batch needs no padding, so one process with the whole batch sees the same pixels
    as W processes with a share of it each.
    """

    def __init__(self, cfg, num_images, size=128):
        self._num_images, self._size = num_images, size
        super().__init__(cfg)

    def build_train_loader(self, cfg):
        records = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[: self._num_images]
        mapper = DatasetMapper(cfg, is_train=True, augmentations=[T.Resize((self._size, self._size))])
        return build_detection_train_loader(
            records, mapper=mapper, sampler=TrainingSampler(len(records), shuffle=False),
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH, aspect_ratio_grouping=False, num_workers=0)


class AssertAllParametersTrained(HookBase):
    """Fails a training step after which a trainable parameter has no gradient. DDP as Detectron2's trainer
    wraps models (``find_unused_parameters=False``) needs every parameter in every step's graph."""

    def after_step(self):
        model = getattr(self.trainer.model, "module", self.trainer.model)  # unwrap DDP
        missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            raise AssertionError(f"iteration {self.trainer.iter}: no gradient for {missing}")


def train_configs_worker(specs, output_root, num_images, size=128, seed=0):
    """Worker of ``d2ext.engine.launch``: train each of ``specs`` (name, config file, opts) in turn with a
    ``DeterministicDataTrainer`` and ``AssertAllParametersTrained``, the model initialised from ``seed``;
    the main process writes ``output_root/name/model_final.pth``. Many configs per launch: starting the
    processes costs far more than training tiny models a few steps."""
    torch.set_num_threads(1)  # one core per process
    for name, config_file, opts in specs:
        cfg = tiny_cfg(config_file, [*opts, "OUTPUT_DIR", os.path.join(output_root, name)])
        torch.manual_seed(seed)
        trainer = DeterministicDataTrainer(cfg, num_images, size)
        trainer.register_hooks([AssertAllParametersTrained()])
        trainer.train()
