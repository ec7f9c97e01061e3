"""On CUDA: models with towers merged (the GPU default) vs apart give the same inference outputs and training
losses / gradients (random weights, score threshold 0 so that all 100 detections are post-processed)."""
import functools, os, sys, torch
sys.path.insert(0, os.getcwd())
import d2ext  # noqa
from d2ext import benchmark
from d2ext.engine import setup_cfg
from d2ext.layers import run_towers
import rdsnet_d2.object_stream as rds_head, adet_lite.fcos.head as fcos_head
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
CASES = {"rdsnet_R18_FPN_synthetic": ["MODEL.RETINANET.SCORE_THRESH_TEST", 0.0],
         "condinst_R18_synthetic": ["MODEL.FCOS.INFERENCE_TH_TEST", 0.0],
         "blendmask_R18_synthetic": ["MODEL.FCOS.INFERENCE_TH_TEST", 0.0]}
def run(name, opts, merge):
    for mod in (rds_head, fcos_head):
        mod.run_towers = functools.partial(run_towers, merge=merge)
    cfg = setup_cfg(f"configs/quickstart/{name}.yaml", ["MODEL.WEIGHTS", "", "MODEL.DEVICE", os.environ.get("DEV", "cuda"), *opts])
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = benchmark.synthetic_batch(cfg, 2, 384, 512)
    model.train()
    with EventStorage():
        losses = model(batch)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    with torch.no_grad():
        out = model([{k: v for k, v in d.items() if k != "instances"} for d in batch])
    return {k: float(v) for k, v in losses.items()}, grads, [o["instances"].to("cpu") for o in out]
torch.backends.cudnn.deterministic = True
for name, opts in CASES.items():
    (l1, g1, o1), (l0, g0, o0) = run(name, opts, True), run(name, opts, False)
    loss_diff = max(abs(l1[k] - l0[k]) / max(abs(l0[k]), 1e-6) for k in l0)
    grad_diff = max(float((g1[n] - g0[n]).norm() / (g0[n].norm() + 1e-12)) for n in g0)
    n1, n0 = [len(o) for o in o1], [len(o) for o in o0]
    box = max(float((a.pred_boxes.tensor - b.pred_boxes.tensor).abs().max()) for a, b in zip(o1, o0) if len(a) and len(a) == len(b))
    mask = min(float((a.pred_masks == b.pred_masks).float().mean()) for a, b in zip(o1, o0) if len(a) and len(a) == len(b))
    print(f"{name}: detections {n1} vs {n0}; max rel loss diff {loss_diff:.2e}; max rel grad diff {grad_diff:.2e}; "
          f"max box diff {box:.2e} px; min mask pixel agreement {mask:.6f}", flush=True)
