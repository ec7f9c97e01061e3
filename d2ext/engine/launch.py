"""Detectron2's ``launch``, extended to multi-process training on CPU (gloo).

Detectron2 v0.6's ``launch`` asserts CUDA and uses NCCL. For CUDA models we call it unchanged (NCCL,
one or many machines); for CPU models (``MODEL.DEVICE cpu``, or no CUDA) we spawn the processes ourselves
with the gloo backend and set up Detectron2's per-machine process group the same way, so ``comm``, the
samplers and DDP behave as on GPUs.
"""
import logging
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

logger = logging.getLogger(__name__)
DEFAULT_TIMEOUT = timedelta(minutes=30)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def launch(main_func, num_processes_per_machine, num_machines=1, machine_rank=0, dist_url=None,
           args=(), timeout=DEFAULT_TIMEOUT, device=None):
    """Same contract as ``detectron2.engine.launch``; ``num_processes_per_machine`` is --num-gpus.

    ``device`` is the model's (``cfg.MODEL.DEVICE``): a CPU model trains in gloo processes even where CUDA is
    available (NCCL would reject its tensors). None: CUDA where available.
    """
    world_size = num_machines * num_processes_per_machine
    on_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if world_size == 1 or on_cuda:
        return d2_launch(main_func, num_processes_per_machine, num_machines=num_machines,
                         machine_rank=machine_rank, dist_url=dist_url, args=args, timeout=timeout)
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url must be given (tcp://host:port) for multi-machine jobs")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    logger.info("Launching %d CPU processes with the gloo backend", world_size)
    mp.spawn(_cpu_worker, nprocs=num_processes_per_machine, daemon=False,
             args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args, timeout))


def _cpu_worker(local_rank, main_func, world_size, per_machine, machine_rank, dist_url, args, timeout):
    rank = machine_rank * per_machine + local_rank
    dist.init_process_group("gloo", init_method=dist_url, world_size=world_size, rank=rank,
                            timeout=timeout)
    if hasattr(comm, "create_local_process_group"):  # Detectron2 main
        comm.create_local_process_group(per_machine)
    else:  # v0.6: every process creates every machine's group, keeps its own
        for machine in range(world_size // per_machine):
            group = dist.new_group(list(range(machine * per_machine, (machine + 1) * per_machine)))
            if machine == machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()
