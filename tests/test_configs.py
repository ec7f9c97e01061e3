"""Every YAML under configs/ merges into the repository's config, builds on CPU (random init) and
runs one inference forward."""
import glob
import os

import pytest
import torch

from d2ext.testing import build_tiny_model, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"),
                                                             recursive=True))


def test_configs_exist():
    assert "configs/quickstart/mask_rcnn_R18_FPN_synthetic.yaml" in CONFIGS


@pytest.mark.parametrize("config", CONFIGS)
def test_config_builds_and_runs_inference(config):
    cfg = tiny_cfg(os.path.join(REPO, config))
    model = build_tiny_model(cfg).eval()
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)
    with torch.no_grad():
        (output,) = model([{"image": image, "height": 96, "width": 128}])
    assert set(output) & {"instances", "sem_seg", "panoptic_seg"}, f"{config}: unexpected output {set(output)}"
    if "instances" in output:
        assert output["instances"].image_size == (96, 128)
