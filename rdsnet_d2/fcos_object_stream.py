"""RDSNet with FCOS as its object stream (the paper: any regression-based detector can be the object
stream). FCOS is adet_lite's, imported when such a model is built, so that the rest of rdsnet_d2 does not
need adet_lite."""
import torch
from torch import nn
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, build_proposal_generator

from d2ext.config_checks import check_every_feature_read
from d2ext.layers import PixelNormalizationMixin, register_empty_load_check

from .correlation import object_rep_length
from .masks import RDSNetMasks


@META_ARCH_REGISTRY.register()
class RDSNetFCOS(RDSNetMasks, PixelNormalizationMixin, nn.Module):
    """RDSNet whose object stream is FCOS (``adet_lite``). Each FCOS location predicts, besides class, box
    and centerness, an object representation of 2 x d values (background slot, then foreground) with a 3x3
    conv on FCOS's box tower, as CondInst's controller does (the RetinaNet object stream has a separate
    representation tower instead). FCOS's positive locations train the masks and its detections get them;
    the pixel stream, correlation, cropping, OHEM and MBRM are RDSNet's (:class:`RDSNetMasks`).

    Inference returns, per image, ``Instances`` at the original image size with ``pred_boxes``,
    ``scores``, ``pred_classes`` and boolean ``pred_masks`` (N, H, W).
    """

    @configurable
    def __init__(self, *, backbone: Backbone, proposal_generator: nn.Module, rep_conv: nn.Module, pixel_mean,
                 pixel_std, mask_options):
        """
        Args:
            proposal_generator: adet_lite's ``FCOS``.
            rep_conv: the 3x3 conv from FCOS's box tower to 2 x L channels (L = ``object_rep_length``).
            mask_options: the mask side's arguments (:meth:`RDSNetMasks.init_masks`).
        """
        super().__init__()
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.rep_conv = rep_conv
        self.register_pixel_stats(pixel_mean, pixel_std)
        self.init_masks(**mask_options)
        register_empty_load_check(self)

    @classmethod
    def from_config(cls, cfg):
        # Lazy: only this object stream needs adet_lite.
        from adet_lite.fcos.config import check_fcos_proposal_generator
        from adet_lite.fcos.head import top_feats_conv

        check_fcos_proposal_generator(cfg, "RDSNetFCOS")
        backbone = build_backbone(cfg)
        backbone_shape = backbone.output_shape()
        check_every_feature_read(
            backbone_shape,
            {"MODEL.FCOS.IN_FEATURES": cfg.MODEL.FCOS.IN_FEATURES,
             "MODEL.RDSNET.PIXEL_IN_FEATURES": cfg.MODEL.RDSNET.PIXEL_IN_FEATURES},
            "set MODEL.FCOS.TOP_LEVELS (levels above P5) or MODEL.FPN.IN_FEATURES to build only what is read",
        )
        rep_length = object_rep_length(cfg.MODEL.RDSNET.REP_DIM, cfg.MODEL.RDSNET.BOX_COORD_TERMS)
        return {
            "backbone": backbone,
            "proposal_generator": build_proposal_generator(cfg, backbone_shape),
            "rep_conv": top_feats_conv(backbone_shape, 2 * rep_length),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "mask_options": cls.mask_options(cfg, backbone_shape),
        }

    def training_losses(self, batched_inputs, gt_instances):
        """FCOS's losses and ``loss_mask`` on FCOS's positive locations."""
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        predictions = self.proposal_generator.predict(features, self.rep_conv)
        losses, positives = self.proposal_generator.losses(predictions, gt_instances)
        # FCOS numbers the GT instances across the batch; the mask side wants each image's own indices.
        first_gt = torch.tensor([0] + [len(gt) for gt in gt_instances[:-1]], device=self.device).cumsum(0)
        losses["loss_mask"] = self.mask_loss(images.tensor.shape[-2:], self.pixel_stream(features), positives.im_inds,
                                             positives.gt_inds - first_gt[positives.im_inds], positives.top_feats,
                                             gt_instances)
        return losses

    def run_detection(self, batched_inputs):
        """The mask side's input: the padded images, per image FCOS's detections at the input size with
        their locations' ``object_reps`` (N, 2, L), and the pixel representations."""
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        predictions = self.proposal_generator.predict(features, self.rep_conv)
        detections = self.proposal_generator.inference(predictions, images.image_sizes)
        for image_detections in detections:
            image_detections.object_reps = image_detections.top_feat.view(-1, 2, self.object_rep_length)
            image_detections.remove("top_feat")
        return images, detections, self.pixel_stream(features)
