// The Python module `mmattn._C`: importing it loads this library, whose static initialisers
// register the CPU/CUDA implementations of the mmattn:: ops (their schemas are defined in
// Python, mmattn/ops/extension.py). It exports one function, `built_with_cuda()`.
#include <Python.h>

namespace {

PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS,
     "Whether this build includes the CUDA kernels."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "mmattn's compiled kernels (see mmattn.ops.extension)", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
