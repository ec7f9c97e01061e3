"""Export of this repository's models by tracing: TorchScript (``torch.jit.trace`` of Detectron2's
``TracingAdapter``) and ONNX (torch's TorchScript-based exporter, ``dynamo=False``).

What is exported follows Detectron2's ``tools/deploy/export_model.py``: the model's
``inference([{"image": image}], do_postprocess=False)`` on one (C, H, W) image, already resized by the
test-time augmentation, returning the detections at that input resolution (``pred_boxes``, ``scores``,
``pred_classes``, ``pred_masks`` and the model's other fields). The final resize to the original image
size is not part of the exported graph: :func:`postprocess` runs it after the exported model, in Python,
with the model's own post-processing.

Every size derived from the input stays dynamic: one export runs on images of any size.
"""
import contextlib
import importlib
import inspect
import os
import sys
import types

import numpy as np
import torch
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Instances


def _import_detectron2_export(submodule):
    """``detectron2.export.<submodule>``. The ``__init__`` of v0.6's ``detectron2.export`` imports its
    Caffe2 exporter, which needs ``caffe2`` (no longer part of torch): when that fails, the package is
    registered without running its ``__init__``, so that the tracing modules import on their own."""
    try:
        importlib.import_module("detectron2.export")
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith("caffe2"):
            raise
        import detectron2

        package = types.ModuleType("detectron2.export")
        package.__path__ = [os.path.join(os.path.dirname(detectron2.__file__), "export")]
        sys.modules["detectron2.export"] = package
    return importlib.import_module(f"detectron2.export.{submodule}")


TracingAdapter = _import_detectron2_export("flatten").TracingAdapter
patch_builtin_len = _import_detectron2_export("torchscript_patch").patch_builtin_len

EXPORT_FORMATS = ("torchscript", "onnx")
# Our modules that take len() of Instances or tensors at inference. Patched like Detectron2's own heads
# (``patch_builtin_len``): len() then returns the traced size, not a constant of the graph.
LEN_PATCHED_MODULES = (
    "adet_lite.blendmask.blendmask",
    "adet_lite.condinst.condinst",
    "nlroi_d2.head_mixin",
    "nlroi_d2.roi_heads",
    "rdsnet_d2.masks",
)
# The ONNX opset: torchvision's NMS needs >= 11, its RoIAlign with aligned=True (ROIAlignV2 of the R-CNN
# heads and BlendMask's blender) >= 16. The models are tested with 17.
ONNX_OPSET = 17


def check_exportable(model):
    """Raise a ``ValueError`` that names the setting when ``model`` cannot be exported faithfully (the
    exported graph would compute something else than the eager model)."""
    name = type(model).__name__
    inference = getattr(model, "inference", None)
    if inference is None or "do_postprocess" not in inspect.signature(inference).parameters:
        raise ValueError(f"{name} cannot be exported: it has no inference(batched_inputs, do_postprocess) method")
    roi_heads = getattr(model, "roi_heads", None)
    # NL-RoI's settings: on the box predictor (NLRoIROIHeads) or on the cascade heads.
    settings = [getattr(roi_heads, "postprocess", None), getattr(getattr(roi_heads, "box_predictor", None), "postprocess", None)]
    if any(getattr(s, "changes_nms", False) for s in settings):
        raise ValueError(f"{name} with Soft-NMS or box voting cannot be exported (their greedy loops over the "
                         "detections do not trace): set MODEL.ROI_HEADS.SOFT_NMS.ENABLED and "
                         "MODEL.ROI_HEADS.BOX_VOTE.ENABLED False (hard NMS) to export")
    # RDSNet refines inside the traced inference (untested there); GeneralizedRCNNWithMBRM and adet_lite's
    # models (``mbrm`` set by MODEL.MBRM.ENABLED or TRAIN) in their post-processing, after it.
    if getattr(model, "mbrm", None) is not None:
        raise ValueError(f"{name} with MBRM box refinement cannot be exported: set MODEL.MBRM.ENABLED False "
                         "(and MODEL.MBRM.TRAIN False)")
    if getattr(model, "panoptic_module", None) is not None:
        raise ValueError(f"{name} with the panoptic output cannot be exported (what is traced is the detections "
                         "alone): set MODEL.PANOPTIC_FPN.COMBINE.ENABLED False to export its instance model")
    params = getattr(model, "inference_params", None)
    if getattr(params, "nms_type", None) == "mask":
        raise ValueError(f"{name} with greedy mask NMS cannot be exported (a sequential loop over the "
                         "detections): set NMS_TYPE 'matrix' (Matrix NMS) to export")
    if model.training:
        raise ValueError(f"{name} is in training mode: call model.eval() before exporting")


def _trace_inference(model, inputs):
    """What the ``TracingAdapter`` traces: detections at the input resolution, with ``image_size`` as a
    (2,) tensor so that it stays an output of the graph (a tuple of sizes would become constants)."""
    instances = model.inference(inputs, do_postprocess=False)[0]
    size = torch.stack([s if isinstance(s, torch.Tensor) else torch.tensor(s) for s in instances.image_size])
    return Instances(size, **instances.get_fields())


@contextlib.contextmanager
def _tracing_context():
    with torch.no_grad(), patch_builtin_len(LEN_PATCHED_MODULES):
        yield


def tracing_adapter(model, image):
    """Detectron2's ``TracingAdapter`` around ``model`` for one (C, H, W) image, already run once so that
    its ``outputs_schema`` (how to rebuild ``Instances`` from the flat outputs) is known.

    Returns:
        (adapter, its flat outputs on ``image``).
    """
    check_exportable(model)
    # In eval mode like the model: torch.onnx.export restores the adapter's mode when it is done, and a new
    # module's default (training) would switch the model to training.
    adapter = TracingAdapter(model, [{"image": image}], inference_func=_trace_inference).eval()
    with _tracing_context():
        outputs = adapter(*adapter.flattened_inputs)
    return adapter, outputs


def output_names(outputs_schema):
    """Names of the flat outputs: the ``Instances`` fields in the schema's (sorted) order, then ``image_size``."""
    return [*outputs_schema.keys, "image_size"]


def export_torchscript(model, image, path=None):
    """Trace ``model`` on ``image`` into a TorchScript module (saved to ``path`` if given).

    Returns:
        (traced module, ``outputs_schema``) for :func:`run_exported`.
    """
    adapter, _ = tracing_adapter(model, image)
    with _tracing_context():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    if path is not None:
        traced.save(path)
    return traced, adapter.outputs_schema


def export_onnx(model, image, path):
    """Export ``model``, traced on ``image``, to the ONNX file ``path`` (input ``image`` (3, H, W) with
    dynamic H and W; outputs named by :func:`output_names`, every dimension dynamic).

    Returns:
        the ``outputs_schema`` for :func:`run_exported`.
    """
    adapter, outputs = tracing_adapter(model, image)
    names = output_names(adapter.outputs_schema)
    dynamic_axes = {"image": {1: "height", 2: "width"}}
    for name, output in zip(names, outputs):
        dynamic_axes[name] = {dim: f"{name}_{dim}" for dim in range(output.dim())}
    with _tracing_context():
        torch.onnx.export(adapter, adapter.flattened_inputs, path, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=names, dynamic_axes=dynamic_axes)
    return adapter.outputs_schema


def onnx_session(path):
    """An onnxruntime CPU session of an exported file (onnxruntime: ``pip install -e .[dev]``)."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("running ONNX exports needs onnxruntime (pip install onnxruntime)") from e
    options = onnxruntime.SessionOptions()
    # onnxruntime's graph optimisations (every level, 1.31) rewrite some reshapes of the mask heads into
    # ones that fail on an image without detections ("The input tensor cannot be reshaped to the requested
    # shape"): off, every model runs on such images too.
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_exported(exported, outputs_schema, image):
    """Run a traced module or an onnxruntime session on a (C, H, W) image.

    Returns:
        ``Instances`` at the input resolution, as the eager ``inference(..., do_postprocess=False)``.
    """
    if isinstance(exported, torch.nn.Module):
        with torch.no_grad():
            outputs = exported(image)
    else:
        feed = {exported.get_inputs()[0].name: image.cpu().numpy()}
        outputs = [torch.from_numpy(np.asarray(x)) for x in exported.run(None, feed)]
    instances = outputs_schema(tuple(outputs))
    return Instances(tuple(int(s) for s in instances.image_size), **instances.get_fields())


def postprocess(model, instances, height, width):
    """The final step the exported graph leaves out: ``instances`` at the input resolution -> the
    original ``height`` x ``width``, with the model's own ``postprocess`` (Detectron2's
    ``detector_postprocess`` for R-CNN models)."""
    own = getattr(model, "postprocess", None)
    if own is not None:
        return own(instances, height, width)
    return detector_postprocess(instances, height, width)
