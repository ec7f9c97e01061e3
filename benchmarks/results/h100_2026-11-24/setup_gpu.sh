# Device-side set-up (sourced): Detectron2 v0.6 Python code + deps from .gpuenv, _C compiled for this python.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpuenv/whl/*.whl
cp -r .gpuenv/site/* /tmp/site/
export PYTHONPATH=/tmp/site:$PWD
python3 - <<'PY'
import glob, shutil, sysconfig, os
from torch.utils.cpp_extension import load
m = load(name="_C", sources=[".gpuenv/vision.cpp"], build_directory=os.makedirs("/tmp/d2c", exist_ok=True) or "/tmp/d2c", verbose=False)
shutil.copy(m.__file__, "/tmp/site/detectron2/_C" + sysconfig.get_config_var("EXT_SUFFIX"))
PY
set +e
