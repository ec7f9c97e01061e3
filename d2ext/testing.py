"""Helpers for the tests of every package: tiny models from YAML, batches of the built-in data,
train steps, checkpoint round trips and short overfitting runs. No network, CPU only."""
import copy
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from .engine.config import setup_cfg

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_path(relative):
    """Absolute path of a YAML under the repository's ``configs/``."""
    return os.path.join(REPO_ROOT, "configs", relative)


def tiny_cfg(config_file, opts=(), freeze=True):
    """A config on CPU with tests-sized settings layered on top of ``config_file``."""
    return setup_cfg(config_file, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts], freeze=freeze)


def build_tiny_model(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg)


def dataset_batch(cfg, dataset_name="synthetic_shapes_mini_train", indices=(0, 1), is_train=True):
    """Mapped inputs (list of dicts, as a data loader yields them) for the given dataset records.

    Training-time mapping is made deterministic by using the test-time resize (no random flip).
    """
    dicts = DatasetCatalog.get(dataset_name)
    mapper = DatasetMapper(cfg, is_train=False)
    mapper.is_train = is_train  # keep annotations; augmentation stays the deterministic test resize
    batch = []
    for i in indices:
        record = copy.deepcopy(dicts[i])
        batch.append(mapper(record))
    return batch


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


def overfit(model, batch, iterations, lr=0.01, momentum=0.9):
    """Train on one fixed batch; returns the list of total losses (a learning check)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    history = []
    for _ in range(iterations):
        history.append(sum(train_step(model, batch, optimizer).values()))
    return history


def checkpoint_round_trip(model, cfg, directory):
    """Save ``model`` with DetectionCheckpointer into ``directory`` and load it into a new model.

    Returns the new model; the caller compares state dicts and outputs.
    """
    DetectionCheckpointer(model, save_dir=directory).save("round_trip")
    other = build_tiny_model(cfg, seed=1)  # another init, so that loading must overwrite it
    DetectionCheckpointer(other).load(os.path.join(directory, "round_trip.pth"))
    return other
