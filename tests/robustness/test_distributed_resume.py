"""Distributed training and resuming, for every model.

1. Two gloo processes with one image each train every model to the same weights as one process that
   computes what DDP is meant to compute for the whole batch of two (``PerProcessLossesTrainer``): the
   one-process step on the whole batch for the loss terms normalised over all processes, the mean of
   the per-image losses for the others. DDP as Detectron2's trainer wraps models
   (``find_unused_parameters=False``) and ``AssertAllParametersTrained`` also prove that every parameter
   is used in every step.
2. A run stopped after a checkpoint and resumed (in process for every model; killed and ``--resume``d
   through ``projects/train_net.py`` for one) continues at the checkpoint's iteration with the
   uninterrupted run's learning rates, and ends with its weights.

Both compare runs that must see the same pixels: ``DeterministicDataTrainer`` feeds fixed records in
order, resized to one size without random augmentation; the models get norms without batch statistics
(``COMMON``) and, to resume, no random subsampling (``SAMPLE_ALL``).
"""
import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from detectron2.engine import HookBase

from d2ext.engine import Trainer, launch
from d2ext.testing import REPO_ROOT, DeterministicDataTrainer, config_path, tiny_cfg, train_configs_worker

WORLD_SIZE = 2
EQUIVALENCE_ITERS = 3

# Batch statistics differ between one process with two images and two processes with one each (BN
# normalises each process's batch). A frozen-BN backbone and GroupNorm elsewhere make every image's
# features independent of the images it is batched with, so the processes differ only where the
# losses combine images. BlendMask's semantic head keeps AdelaiDet's BatchNorm (not configurable): it
# only feeds loss_basis_sem, a per-process term, which the reference computes per process.
COMMON = [
    "DATASETS.TRAIN", "('synthetic_shapes_mini_train',)", "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0",
    "SOLVER.IMS_PER_BATCH", str(WORLD_SIZE), "SOLVER.WARMUP_ITERS", "0",
    "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.FPN.NORM", "GN",
    # SGD for every model (the quick-start Mask R-CNN trains with AdamW): Adam divides each gradient by its
    # own running magnitude, which turns rounding-level gradients (the NL-RoI block's softmax-invariant
    # biases) into updates as large as the rounding differences being compared.
    "SOLVER.OPTIMIZER", "SGD",
]
# The FCOS head's GroupNorm (32 groups of 64 channels) normalises 2 values per group on the 1 x 1 P7 of
# 128-px images: float rounding flips its outputs and 3 steps amplify that ~1e5x; without that norm the
# head trains smoothly (the DDP / one-process difference it would blur is in the losses, not the norm).
FCOS_HEAD = ["MODEL.FCOS.NORM", ""]
MODELS = {
    "nlroi_mask_rcnn": ("quickstart/nlroi_mask_rcnn_R18_FPN_synthetic.yaml",
                        ["MODEL.ROI_BOX_HEAD.NORM", "GN", "MODEL.ROI_MASK_HEAD.NORM", "GN"]),
    "fcos": ("quickstart/fcos_R18_synthetic.yaml", FCOS_HEAD),
    "condinst": ("quickstart/condinst_R18_synthetic.yaml", [*FCOS_HEAD, "MODEL.CONDINST.MASK_BRANCH.NORM", "GN"]),
    "blendmask": ("quickstart/blendmask_R18_synthetic.yaml", [*FCOS_HEAD, "MODEL.BASIS_MODULE.NORM", "GN"]),
    "solo": ("quickstart/solo_R18_FPN_synthetic.yaml", []),
    "decoupled_solo": ("quickstart/solo_R18_FPN_synthetic.yaml", ["MODEL.SOLO.VARIANT", "DecoupledSOLO"]),
    "solov2": ("quickstart/solov2_R18_FPN_synthetic.yaml", []),
    "rdsnet": ("quickstart/rdsnet_R18_FPN_synthetic.yaml", []),
}
# Detectron2's checkpoints hold no random state: after a resume, random subsampling (Mask R-CNN's anchors
# and proposals, CondInst's positives, RDSNet's mask anchors) draws other samples than the uninterrupted
# run. To compare weights, the resume test trains all of them (fewer proposals keep Mask R-CNN cheap).
SAMPLE_ALL = {
    "nlroi_mask_rcnn": ["MODEL.RPN.BATCH_SIZE_PER_IMAGE", "100000", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
                        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "100000"],
    "condinst": ["MODEL.CONDINST.MAX_PROPOSALS", "-1"],
    "rdsnet": ["MODEL.RDSNET.MASK_SAMPLES_PER_IMAGE", "100000"],
}

# Loss terms normalised by counts summed over all processes, as AdelaiDet does (its FCOS all-reduces the
# number of positives and the sum of centerness targets, which also divides BlendMask's mask loss): with
# DDP's gradient averaging they give what one process computes with the whole batch. Every other term is
# normalised by the process's own counts, as in its reference implementation: Detectron2's Mask R-CNN
# losses, RDSNet's (Detectron2 RetinaNet's running mean of the process's positive anchors; the official
# mmdet v1 code divides by the process's positives too), AdelaiDet's CondInst mask loss (mean over the
# process's positives) and BlendMask semantic loss (BatchNorm), mmdet's / AdelaiDet's SOLO losses (the
# process's positive cells). DDP then averages per-process means, each weighing the same whatever its
# count, which one process with the whole batch does not compute: the reference computes them per process.
FCOS_TERMS = ("loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr")
GLOBAL_TERMS = {"fcos": FCOS_TERMS, "condinst": FCOS_TERMS, "blendmask": FCOS_TERMS + ("loss_mask",)}

# Weights may differ by float rounding (summation order): up to UPDATE_RTOL x how far training moved them
# plus a few float32 steps of their magnitude, at least ATOL (parameters whose gradient is ~0, such as the
# NL-RoI block's softmax-invariant biases, move by rounding only). Rounding reached 2e-3 of the update
# (BlendMask, 3 steps); a loss normalised per process instead of over all processes (or the reverse)
# changes the update by the ratio of the two images' counts, far above 1e-2.
UPDATE_RTOL, WEIGHT_RTOL, ATOL = 1e-2, 1e-6, 1e-9


def model_opts(name, *opts):
    config_file, model_specific = MODELS[name]
    return config_path(config_file), [*COMMON, *model_specific, *opts]


class PerProcessLossesTrainer(DeterministicDataTrainer):
    """One process computing the update of DDP with one image per process (batch ``i`` = process ``i``'s).

    Terms of ``global_terms`` come from the model on the whole batch; every other term is averaged over
    replicas that each see one image, as DDP averages the per-process gradients. A replica has the model's
    parameters at every step and its own state otherwise, like a process: buffers (BN statistics, RDSNet's
    running loss normaliser) and random stream (subsampling), which starts where each process's does (they
    all seed alike). Without per-process terms this is Detectron2's step on the whole batch.
    """

    def __init__(self, cfg, num_images, global_terms=()):
        super().__init__(cfg, num_images)
        self.global_terms = set(global_terms)
        self.replicas = [copy.deepcopy(self.model) for _ in range(cfg.SOLVER.IMS_PER_BATCH)]
        self.random_states = [torch.get_rng_state() for _ in self.replicas]

    def run_step(self):
        batch = next(self._trainer._data_loader_iter)
        self.optimizer.zero_grad()
        if self.global_terms:
            losses = self.model(batch)
            sum(losses[name] for name in self.global_terms).backward()
        for rank, (replica, inputs) in enumerate(zip(self.replicas, batch)):
            self.sync(replica)
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(self.random_states[rank])
                losses = replica([inputs])  # also for its buffers when every term is global
                self.random_states[rank] = torch.get_rng_state()
            per_process = [value for name, value in losses.items() if name not in self.global_terms]
            if per_process:
                (sum(per_process) / len(self.replicas)).backward()
            for param, replica_param in zip(self.model.parameters(), replica.parameters()):
                if replica_param.grad is not None:
                    param.grad = replica_param.grad if param.grad is None else param.grad + replica_param.grad
        self.optimizer.step()

    @torch.no_grad()
    def sync(self, replica):
        """Give ``replica`` the model's parameters (buffers stay the replica's own) and no gradients."""
        for param, replica_param in zip(self.model.parameters(), replica.parameters()):
            replica_param.copy_(param)
            replica_param.grad = None

    def process_state(self, rank=0):
        """The state dict that process ``rank`` of DDP ends with: the parameters and its own buffers."""
        self.sync(self.replicas[rank])
        return self.replicas[rank].state_dict()


def weight_mismatches(actual, expected, initial):
    """Names (with errors) of the tensors of ``actual`` that differ from ``expected`` by more than
    ``UPDATE_RTOL`` x the largest change from ``initial`` + ``WEIGHT_RTOL`` x the largest value + ``ATOL``;
    integer tensors must be equal."""
    assert actual.keys() == expected.keys(), set(actual.keys()) ^ set(expected.keys())
    mismatches = []
    for name, value in expected.items():
        if not value.is_floating_point():
            if not torch.equal(actual[name], value):
                mismatches.append(name)
            continue
        error = float((actual[name] - value).abs().max())
        update = float((value - initial[name]).abs().max())
        if error > UPDATE_RTOL * update + WEIGHT_RTOL * float(value.abs().max()) + ATOL:
            mismatches.append(f"{name}: error {error:.3g}, update {update:.3g}")
    return mismatches


def total_update(state, initial):
    return sum(float((state[n] - initial[n]).abs().sum()) for n, v in state.items() if v.is_floating_point())


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Every model trained ``EQUIVALENCE_ITERS`` steps by two gloo processes, in one launch."""
    root = str(tmp_path_factory.mktemp("ddp"))
    specs = [(name, *model_opts(name, "SOLVER.MAX_ITER", str(EQUIVALENCE_ITERS))) for name in MODELS]
    launch(train_configs_worker, WORLD_SIZE, args=(specs, root, EQUIVALENCE_ITERS * WORLD_SIZE))
    return root


@pytest.mark.parametrize("name", MODELS)
def test_two_processes_train_like_one(name, ddp_runs, tmp_path):
    config_file, opts = model_opts(name, "SOLVER.MAX_ITER", str(EQUIVALENCE_ITERS), "OUTPUT_DIR", str(tmp_path))
    torch.manual_seed(0)  # the initialisation of the DDP run (train_configs_worker)
    reference = PerProcessLossesTrainer(tiny_cfg(config_file, opts), EQUIVALENCE_ITERS * WORLD_SIZE,
                                        GLOBAL_TERMS.get(name, ()))
    initial = copy.deepcopy(reference.process_state())
    reference.train()
    expected = reference.process_state()

    ddp = torch.load(os.path.join(ddp_runs, name, "model_final.pth"), weights_only=False)
    assert ddp["iteration"] == EQUIVALENCE_ITERS - 1
    assert total_update(expected, initial) > 0
    assert weight_mismatches(ddp["model"], expected, initial) == []


class SimulatedCrash(Exception):
    pass


class CrashAfter(HookBase):
    """Raises after iteration ``iteration`` (and after the hooks before it, e.g. its checkpoint)."""

    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            raise SimulatedCrash(f"stopped after iteration {self.iteration}")


def lr_history(trainer):
    return {iteration: lr for lr, iteration in trainer.storage.history("lr").values()}


# Iterations 0, 1 warm up, 2 is after the LR step: a resumed schedule that restarted would differ. The same
# batch at every step: Detectron2's sampler starts its stream anew on resume (it has no state to save).
RESUME_OPTS = ["SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.WARMUP_ITERS", "2",
               "SOLVER.STEPS", "(2,)"]


@pytest.mark.parametrize("name", MODELS)
def test_resume_continues_the_interrupted_run(name, tmp_path):
    def trainer(output_dir, *hooks):
        config_file, opts = model_opts(name, *SAMPLE_ALL.get(name, ()), *RESUME_OPTS,
                                       "OUTPUT_DIR", str(tmp_path / output_dir))
        torch.manual_seed(0)
        result = DeterministicDataTrainer(tiny_cfg(config_file, opts), num_images=WORLD_SIZE)
        result.register_hooks(list(hooks))
        return result

    uninterrupted = trainer("uninterrupted")
    uninterrupted.train()

    interrupted = trainer("interrupted", CrashAfter(1))
    with pytest.raises(SimulatedCrash):
        interrupted.train()
    checkpoint = str(tmp_path / "interrupted" / "model_0000001.pth")
    assert interrupted.checkpointer.get_checkpoint_file() == checkpoint  # the last one before the crash

    resumed = trainer("interrupted")
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    resumed.train()

    expected_lr = lr_history(uninterrupted)
    assert sorted(expected_lr) == [0, 1, 2] and len(set(expected_lr.values())) == 3
    assert lr_history(resumed) == {2: expected_lr[2]}
    at_checkpoint = torch.load(checkpoint, weights_only=False)["model"]
    assert weight_mismatches(resumed.model.state_dict(), uninterrupted.model.state_dict(), at_checkpoint) == []


def expected_lr(cfg, iteration):
    """The learning rate of ``iteration`` in an uninterrupted run of ``cfg``'s schedule."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.SOLVER.BASE_LR)
    scheduler = Trainer.build_lr_scheduler(cfg, optimizer)
    for _ in range(iteration):
        optimizer.step()
        scheduler.step()
    return optimizer.param_groups[0]["lr"]


def test_train_net_killed_and_resumed(tmp_path):
    """projects/train_net.py killed (SIGKILL) once it has written a checkpoint, then ``--resume``d."""
    max_iter = 12  # iterations 3-11 left after the first checkpoint: the kill comes well before the end
    config_file, opts = model_opts(
        "fcos", "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "160", "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.CHECKPOINT_PERIOD", "3", "SOLVER.WARMUP_ITERS", "6", "SOLVER.STEPS", "(9,)",
        "OUTPUT_DIR", str(tmp_path))
    command = [sys.executable, os.path.join(REPO_ROOT, "projects", "train_net.py"), "--config-file", config_file]
    # One thread per process (see tests/conftest.py): two spinning threads on a busy 2-core machine
    # make an iteration ~20x slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([*command, *opts], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not (tmp_path / "last_checkpoint").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert not (tmp_path / "model_final.pth").exists(), "the run ended before it was killed"
    checkpoint = (tmp_path / "last_checkpoint").read_text().strip()  # model_0000002.pth, or a later one
    resumed_from = int(checkpoint[len("model_"):-len(".pth")]) + 1
    saved = torch.load(tmp_path / checkpoint, weights_only=False)
    assert saved["trainer"]["_trainer"]["optimizer"]["state"], "the checkpoint lacks the SGD momentum"

    proc = subprocess.run([*command, "--resume", *opts], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert f"Starting training from iteration {resumed_from}" in log
    assert torch.load(tmp_path / "model_final.pth", weights_only=False)["iteration"] == max_iter - 1
    # metrics.json gets the scalars of the last iteration (Detectron2 writes every 20): its LR is the
    # schedule's, not that of a schedule restarted at the resume (which would not have reached the step).
    with open(tmp_path / "metrics.json") as f:
        record = [json.loads(line) for line in f][-1]
    assert record["iteration"] == max_iter - 1
    assert record["lr"] == pytest.approx(expected_lr(tiny_cfg(config_file, opts), max_iter - 1), rel=1e-6)
