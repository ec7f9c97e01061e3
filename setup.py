from setuptools import find_packages, setup

setup(
    name="d2-instseg-ext",
    version="0.1.0",
    description="Detectron2 extensions for instance segmentation: NL-RoI, RDSNet, FCOS, CondInst, "
    "BlendMask, SOLO",
    python_requires=">=3.9",
    packages=find_packages(include=["d2ext*", "nlroi_d2*", "rdsnet_d2*", "adet_lite*"]),
    # torch, torchvision and Detectron2 are installed by tools/setup_env.sh (or are the user's own):
    # like Detectron2, we do not let pip pick a torch build. Pins live in constraints.txt.
    install_requires=["numpy", "opencv-python-headless", "pycocotools", "imgviz", "tifffile"],
    extras_require={"dev": [
        "pytest>=7.3", "psutil",
        # ONNX export tests (tests/robustness/test_export.py): torch 2.14's TorchScript-based exporter
        # (dynamo=False) writes the graph with `onnx`, and onnxruntime runs it. Tested with onnx 1.23.2 and
        # onnxruntime 1.31.1.
        "onnx>=1.16", "onnxruntime>=1.18",
    ]},
)
