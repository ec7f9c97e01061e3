"""Build and install Detectron2 v0.6 from the PyPI sdist ``pb1-detectron2==0.6`` into this interpreter.

Official Detectron2 is not on PyPI. The sdist ``pb1-detectron2==0.6`` holds the real v0.6 Python code but
(a) ships no C++ sources, so its ``detectron2._C`` extension cannot be built, and (b) keeps the model-zoo
YAMLs where its own setup.py does not package them. This script downloads the sdist, fixes both, applies
the NumPy-2 alias fixes to ``NUMPY2_FIXED_FILES`` and installs it with ``--no-build-isolation`` (its setup.py
imports torch). Run it with the interpreter of the target environment; ``tools/setup_env.sh`` does.

Nothing of Detectron2 is stored in this repository: the code is fetched from PyPI at set-up time.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDIST_REQUIREMENT = "pb1-detectron2==0.6"
CSRC = os.path.join(REPO_ROOT, "tools", "detectron2_csrc", "vision.cpp")

# NumPy 2 removed the aliases np.bool / np.int / np.float / np.str that v0.6 still uses (fixed upstream
# after v0.6). The one that bites instance segmentation is polygons_to_bitmask([]) for an instance whose
# polygons are all dropped; the others break the VOC / sem-seg evaluators and the dataset histogram.
NUMPY2_FIXED_FILES = (
    "detectron2/structures/masks.py",
    "detectron2/data/build.py",
    "detectron2/data/datasets/pascal_voc.py",
    "detectron2/evaluation/sem_seg_evaluation.py",
    "detectron2/evaluation/pascal_voc_evaluation.py",
    "detectron2/utils/visualizer.py",
    "detectron2/utils/video_visualizer.py",
)
NUMPY2_ALIAS = re.compile(r"\bnp\.(bool|int|float|str)\b(?![_\d])")


def run(cmd, **kwargs):
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd, **kwargs)


def download_sdist(workdir, pip_args):
    # `pip download` of an sdist runs its setup.py for metadata; it imports torch, hence no isolation.
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "--no-build-isolation", SDIST_REQUIREMENT, "-d", workdir, *pip_args])
    (archive,) = glob.glob(os.path.join(workdir, "pb1*detectron2-0.6.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")
    (src,) = [p for p in glob.glob(os.path.join(workdir, "pb1*detectron2-0.6")) if os.path.isdir(p)]
    return src


def prepare_tree(src):
    # (a) our own minimal extension source, compiled by the sdist's unchanged setup.py.
    csrc_dir = os.path.join(src, "detectron2", "layers", "csrc")
    os.makedirs(csrc_dir, exist_ok=True)
    shutil.copy(CSRC, os.path.join(csrc_dir, "vision.cpp"))
    # (b) setup.py packages `configs/**` from the tree root (symlinked into detectron2/model_zoo/configs);
    # the sdist has them under detectron2/model_zoo/configs only.
    zoo_configs = os.path.join(src, "detectron2", "model_zoo", "configs")
    if os.path.isdir(zoo_configs) and not os.path.islink(zoo_configs):
        shutil.move(zoo_configs, os.path.join(src, "configs"))
    for rel_path in NUMPY2_FIXED_FILES:
        path = os.path.join(src, rel_path)
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(NUMPY2_ALIAS.sub(r"\1", text))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--constraints", default=os.path.join(REPO_ROOT, "constraints.txt"))
    parser.add_argument("--keep-build-dir", action="store_true")
    args = parser.parse_args()
    pip_args = ["-c", args.constraints]
    workdir = tempfile.mkdtemp(prefix="d2ext-detectron2-")
    try:
        src = download_sdist(workdir, pip_args)
        prepare_tree(src)
        # Non-editable install; the build needs torch (already installed) and setuptools<80.
        run([sys.executable, "-m", "pip", "install", "--no-build-isolation", src, *pip_args],
            cwd=workdir)
    finally:
        if args.keep_build_dir:
            print("build tree kept in", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    # The check the set-up promises: the package imports and the model-zoo YAMLs are installed.
    run([sys.executable, "-c",
         "from detectron2 import model_zoo, _C; import detectron2.layers, detectron2.data; "
         "print('detectron2 OK:', model_zoo.get_config_file("
         "'COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml'))"],
        cwd=workdir if os.path.isdir(workdir) else None)


if __name__ == "__main__":
    main()
