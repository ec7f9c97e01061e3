"""End-to-end tests of the user-facing entry points: train_net (train, --eval-only, --resume, 2 CPU
processes) and demo, on the tiny quick-start model and the mini synthetic splits."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "quickstart", "mask_rcnn_R18_FPN_synthetic.yaml")
TINY = [
    "DATASETS.TRAIN", "('synthetic_shapes_mini_train',)", "DATASETS.TEST", "('synthetic_shapes_mini_val',)",
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "192", "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "192", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
]


# One thread per process, as in tests/conftest.py: the tiny models gain nothing from a second thread, and
# the two-process run would oversubscribe a 2-core machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(script, *args, timeout=300):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "projects", script), *args],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def training_iterations_logged(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        records = [json.loads(line) for line in f]
    return [r["iteration"] for r in records if "total_loss" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train"))
    log = run("train_net.py", "--config-file", CONFIG, *TINY, "SOLVER.MAX_ITER", "4",
              "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", out)
    return out, log


def test_train_writes_checkpoints_and_evaluates_with_coco(trained):
    out, log = trained
    assert os.path.exists(os.path.join(out, "model_final.pth"))
    assert os.path.exists(os.path.join(out, "model_0000001.pth"))  # CHECKPOINT_PERIOD 2
    assert "Evaluation results for bbox" in log and "Evaluation results for segm" in log
    assert "Evaluating predictions with official COCO API" in log  # pycocotools on the lite build
    assert training_iterations_logged(out) == [3]


def test_eval_only(trained):
    out, _ = trained
    log = run("train_net.py", "--config-file", CONFIG, "--eval-only", *TINY,
              "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "OUTPUT_DIR", out)
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    assert "Evaluation results for segm" in log


def test_eval_only_without_weights_is_an_error(tmp_path):
    """Not an evaluation of a randomly initialised model."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "projects", "train_net.py"), "--config-file", CONFIG,
                           "--eval-only", *TINY, "OUTPUT_DIR", str(tmp_path)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--eval-only needs trained weights: MODEL.WEIGHTS is empty" in proc.stderr
    assert "Evaluation results" not in proc.stdout + proc.stderr


def test_resume_continues_from_the_last_checkpoint(trained, tmp_path):
    out, _ = trained
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    # The directory of an interrupted run: its checkpoint after iteration 2 and `last_checkpoint`.
    os.link(os.path.join(out, "model_0000001.pth"), os.path.join(resumed, "model_0000001.pth"))
    with open(os.path.join(resumed, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")
    log = run("train_net.py", "--config-file", CONFIG, "--resume", *TINY, "SOLVER.MAX_ITER", "4",
              "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
              "OUTPUT_DIR", resumed)
    assert "Starting training from iteration 2" in log
    assert training_iterations_logged(resumed) == [3]  # iterations 2 and 3 run; metrics logged at the end


def test_two_cpu_processes_train(tmp_path):
    log = run("train_net.py", "--config-file", CONFIG, "--num-gpus", "2", *TINY,
              "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path))
    assert "World size: 2" in log
    assert os.path.exists(tmp_path / "model_final.pth")


def test_demo_writes_overlays(trained, tmp_path):
    out, _ = trained
    vis = tmp_path / "vis"
    run("demo.py", "--config-file", CONFIG, "--dataset", "synthetic_shapes_mini_val", "--max-images", "2",
        "--output", str(vis), "--opts", *TINY, "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"))
    assert sorted(os.listdir(vis)) == ["00000.png", "00001.png"]
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        os.link(os.path.join(vis, "00000.png"), folder / name)
    run("demo.py", "--config-file", CONFIG, "--input", str(folder), "--output", str(tmp_path / "vis2"),
        "--opts", *TINY, "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"))
    assert sorted(os.listdir(tmp_path / "vis2")) == ["a.png", "b.png"]


def test_demo_names_an_unreadable_image(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "projects", "demo.py"), "--config-file", CONFIG,
                           "--input", str(bad), "--output", str(tmp_path / "o"), "--opts", *TINY],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"cannot read image '{bad}'" in proc.stderr
