from detectron2.modeling import META_ARCH_REGISTRY, ProposalNetwork


@META_ARCH_REGISTRY.register()
class OneStageDetector(ProposalNetwork):
    """A backbone and a detecting proposal generator (FCOS) used as the detector itself.

    Identical to Detectron2's ``ProposalNetwork`` except that inference returns ``{"instances": ...}``
    (``pred_boxes``, ``scores``, ``pred_classes``), so evaluators, ``DefaultPredictor`` and the
    visualiser treat it like any detector. AdelaiDet's name, so its YAMLs select it.
    """

    def forward(self, batched_inputs):
        outputs = super().forward(batched_inputs)
        if self.training:
            return outputs
        return [{"instances": output["proposals"]} for output in outputs]
