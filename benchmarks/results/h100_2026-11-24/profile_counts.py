"""Per inference (800x1333, batch 1, random weights, all 100 detections): kernels launched, GPU busy time,
host syncs, wall time; the four models of the RDSNet and BlendMask speed targets."""
import argparse, os, sys, time, torch
sys.path.insert(0, "benchmarks")
from torch.profiler import profile, ProfilerActivity
from torch.autograd import DeviceType
import rdsnet_bench, speed, blendmask_bench
from d2ext import benchmark
args = argparse.Namespace(device="cuda", size=[800, 1333], batch_size=1)

def rdsnet_step(name):
    model, images = rdsnet_bench._model_and_images(name, args, 1)
    return lambda: model(images)

def speed_step(config, opts, prepare=None):
    cfg = speed._config(config, opts, args)
    batch = benchmark.synthetic_batch(cfg, 1, *args.size)
    return benchmark.model_step(cfg, "inference", batch, prepare)

STEPS = {
    "rdsnet_mbrm": lambda: rdsnet_step("rdsnet_R_50_FPN_1x_refine (MBRM)"),
    "retinanet": lambda: rdsnet_step("detectron2 retinanet_R_50_FPN_1x"),
    "rdsnet": lambda: rdsnet_step("rdsnet_R_50_FPN_1x"),
    "mask_rcnn": lambda: speed_step(None, []),
    "blendmask": lambda: speed_step(os.path.abspath("configs/BlendMask/R_50_1x.yaml"), ["MODEL.FCOS.INFERENCE_TH_TEST", 0.0],
                                    blendmask_bench.nonempty_fcos_boxes),
}
for name in sys.argv[1:]:
    step = STEPS[name]()
    with torch.no_grad():
        for _ in range(5): step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20): step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / 20
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(5): step()
            torch.cuda.synchronize()
    ev = p.events()
    kernels = [e for e in ev if e.device_type == DeviceType.CUDA]
    launches = sum(1 for e in ev if e.name.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
    syncs = sum(1 for e in ev if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    memcpy = sum(1 for e in ev if e.name == "cudaMemcpyAsync")
    gpu_ms = sum(e.device_time for e in kernels) / 1e3 / 5
    print(f"{name}: wall {1e3*wall:.1f} ms (mean of 20, unprofiled), GPU busy {gpu_ms:.1f} ms, {len(kernels)/5:.0f} GPU activities, "
          f"{launches/5:.0f} kernel launches, {memcpy/5:.0f} memcpy, {syncs/5:.0f} stream syncs per inference", flush=True)
