// Minimal `detectron2._C` for building the PyPI sdist `pb1-detectron2==0.6`, which ships without
// Detectron2's C++/CUDA sources (detectron2/layers/csrc). Without any `_C`, `import detectron2.layers`
// fails, so tools/build_detectron2.py drops this file in as detectron2/layers/csrc/vision.cpp.
//
// It provides what Detectron2's Python code needs at import time and in `collect_env`, and, for every
// compiled op the real extension has, a function that raises a clear error naming the op instead of an
// AttributeError deep inside a layer. `MISSING_OPS` lists them so Python code can detect the lite build
// (d2ext's evaluator uses it to fall back to pycocotools' COCOeval).
//
// Plain CPython API on purpose: no torch headers, so it compiles in about a second.
#include <Python.h>

#define D2EXT_STR(x) #x

static PyObject* get_compiler_version(PyObject*, PyObject*) {
#if defined(__clang__)
  return PyUnicode_FromFormat("clang %d.%d", __clang_major__, __clang_minor__);
#elif defined(__GNUC__)
  return PyUnicode_FromFormat("GCC %d.%d", __GNUC__, __GNUC_MINOR__);
#else
  return PyUnicode_FromString("unknown");
#endif
}

static PyObject* get_cuda_version(PyObject*, PyObject*) {
  return PyUnicode_FromString("not available (d2ext lite build, CPU ops only)");
}

static PyObject* has_cuda(PyObject*, PyObject*) { Py_RETURN_FALSE; }

static PyObject* raise_missing(const char* op) {
  PyErr_Format(PyExc_NotImplementedError,
               "detectron2._C.%s is not available: this Detectron2 was built from the PyPI sdist "
               "pb1-detectron2==0.6 with d2ext's minimal _C (no compiled ops). Install an official "
               "Detectron2 build to use it, or use a pure-PyTorch alternative "
               "(torchvision.ops.deform_conv2d for deformable convolutions, "
               "pycocotools' COCOeval instead of COCOeval_opt).",
               op);
  return nullptr;
}

#define MISSING_OP(name) \
  static PyObject* name(PyObject*, PyObject*, PyObject*) { return raise_missing(D2EXT_STR(name)); }

// The compiled ops of Detectron2 v0.6's vision.cpp, by the names its Python code calls.
MISSING_OP(box_iou_rotated)
MISSING_OP(roi_align_rotated_forward)
MISSING_OP(roi_align_rotated_backward)
MISSING_OP(deform_conv_forward)
MISSING_OP(deform_conv_backward_input)
MISSING_OP(deform_conv_backward_filter)
MISSING_OP(modulated_deform_conv_forward)
MISSING_OP(modulated_deform_conv_backward)
MISSING_OP(InstanceAnnotation)
MISSING_OP(COCOevalEvaluateImages)
MISSING_OP(COCOevalAccumulate)

#define OP_ENTRY(name) \
  {D2EXT_STR(name), (PyCFunction)(void (*)(void))name, METH_VARARGS | METH_KEYWORDS, \
   "Not available in this build; raises NotImplementedError."}

static PyMethodDef methods[] = {
    {"get_compiler_version", get_compiler_version, METH_NOARGS, "Compiler that built this module."},
    {"get_cuda_version", get_cuda_version, METH_NOARGS, "CUDA version (none in this build)."},
    {"has_cuda", has_cuda, METH_NOARGS, "Whether CUDA ops were compiled (never here)."},
    OP_ENTRY(box_iou_rotated),
    OP_ENTRY(roi_align_rotated_forward),
    OP_ENTRY(roi_align_rotated_backward),
    OP_ENTRY(deform_conv_forward),
    OP_ENTRY(deform_conv_backward_input),
    OP_ENTRY(deform_conv_backward_filter),
    OP_ENTRY(modulated_deform_conv_forward),
    OP_ENTRY(modulated_deform_conv_backward),
    OP_ENTRY(InstanceAnnotation),
    OP_ENTRY(COCOevalEvaluateImages),
    OP_ENTRY(COCOevalAccumulate),
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                                    "Minimal detectron2._C built by d2ext (no compiled ops).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  PyObject* missing = Py_BuildValue(
      "(sssssssssss)", "box_iou_rotated", "roi_align_rotated_forward", "roi_align_rotated_backward",
      "deform_conv_forward", "deform_conv_backward_input", "deform_conv_backward_filter",
      "modulated_deform_conv_forward", "modulated_deform_conv_backward", "InstanceAnnotation",
      "COCOevalEvaluateImages", "COCOevalAccumulate");
  if (missing == nullptr || PyModule_AddObject(m, "MISSING_OPS", missing) < 0) {
    Py_XDECREF(missing);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
