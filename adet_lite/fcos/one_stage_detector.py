from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, ProposalNetwork
from detectron2.modeling.postprocessing import detector_postprocess

from d2ext.layers import (PixelNormalizationMixin, check_input_images, postprocess_per_image,
                          register_empty_load_check)


@META_ARCH_REGISTRY.register()
class OneStageDetector(PixelNormalizationMixin, ProposalNetwork):
    """A backbone and a detecting proposal generator (FCOS) used as the detector itself.

    Identical to Detectron2's ``ProposalNetwork`` except that inference returns ``{"instances": ...}``
    (``pred_boxes``, ``scores``, ``pred_classes``), so evaluators, ``DefaultPredictor`` and the
    visualiser treat it like any detector. AdelaiDet's name, so its YAMLs select it.
    """

    @configurable
    def __init__(self, **kwargs):
        """``ProposalNetwork``'s arguments. A checkpoint that loads nothing into it is an error."""
        super().__init__(**kwargs)
        register_empty_load_check(self)

    def forward(self, batched_inputs):
        if self.training:
            # ProposalNetwork normalises the images without preprocess_image.
            check_input_images(batched_inputs, len(self.pixel_mean))
            return super().forward(batched_inputs)
        return self.inference(batched_inputs)

    def inference(self, batched_inputs, do_postprocess=True):
        """As ``GeneralizedRCNN.inference``: per image ``{"instances": Instances}`` at the original size,
        or without ``do_postprocess`` the ``Instances`` at the input size (what export traces)."""
        images = self.preprocess_image(batched_inputs)
        detections, _ = self.proposal_generator(images, self.backbone(images.tensor))
        if not do_postprocess:
            return detections
        return postprocess_per_image(detections, batched_inputs, images.image_sizes, detector_postprocess)
