// The Python extension `retention._C` exposes no Python functions: importing it runs the static
// TORCH_LIBRARY registrars, and Python reaches the ops through torch.ops.retention.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
