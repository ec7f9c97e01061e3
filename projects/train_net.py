#!/usr/bin/env python
"""Train or evaluate any model of this repository, exactly like Detectron2's ``tools/train_net.py``.

    python projects/train_net.py --config-file configs/quickstart/mask_rcnn_R18_FPN_synthetic.yaml
    python projects/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python projects/train_net.py --config-file CFG --resume            # continue from last_checkpoint
    python projects/train_net.py --config-file CFG --num-gpus 2        # DDP (gloo processes on CPU)
"""
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, default_setup

from d2ext.engine import Trainer, launch, setup_cfg


def setup(args):
    cfg = setup_cfg(args.config_file, args.opts)
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        # fvcore only logs that it found nothing to load; the evaluation of an untrained model would follow.
        if not cfg.MODEL.WEIGHTS and not (args.resume and checkpointer.has_checkpoint()):
            raise ValueError("--eval-only needs trained weights: MODEL.WEIGHTS is empty (set it, or --resume from "
                             f"a last_checkpoint in OUTPUT_DIR {cfg.OUTPUT_DIR!r})")
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    # The config's device decides NCCL (CUDA) or gloo (CPU) processes.
    device = setup_cfg(args.config_file, args.opts).MODEL.DEVICE
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,), device=device)
