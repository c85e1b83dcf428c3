// The Python module: the only file that includes pybind11 and torch's Python headers.
//
// torch/csrc/utils/pybind.h (pybind11 and its casters for Tensor, Generator, ...) is the part of
// <torch/extension.h> a module of functions needs, and compiles several times faster; <torch/extension.h>
// (the documented header, which includes it) stands in wherever a torch lacks it.
#if __has_include(<torch/csrc/utils/pybind.h>)
#include <torch/csrc/utils/pybind.h>
#else
#include <torch/extension.h>
#endif

#include "charrnn.h"

namespace charrnn {
bool g_portable = false;
}  // namespace charrnn

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace charrnn;
  using Tensors = std::vector<Tensor>;
  const auto released = py::call_guard<py::gil_scoped_release>();
  py::class_<Step>(m, "Step")
      .def(py::init<int64_t, int64_t, Tensor, std::vector<Tensors>, std::vector<Tensors>, Tensors, int64_t>())
      .def("step", &Step::step, released);
  m.def("lstm_forward", &lstm_forward, released);
  m.def("lstm_backward", &lstm_backward, released);
  m.def("gru_forward_step", &gru_forward_step, released);
  m.def("gru_backward_step", &gru_backward_step, released);
  m.def("dropout", &dropout, py::arg("x"), py::arg("p"), py::arg("seed"), py::arg("offset") = 0,
        py::arg("out") = py::none(), released);
  m.def("pack_panels", &pack_panels, released);
  m.def("packed_matmul", &packed_matmul, released);
  m.def("has_fma", &has_fma);
  m.def("use_panels", &use_panels, "whether a product of this many rows goes through packed_matmul");
  m.def("int8_linear", &int8_linear, released);
  m.def("sample", &sample, released);
  m.def("sample_rows", &sample_rows, released);
  m.def("has_avx2", &has_avx2);
  m.def("set_portable", [](bool on) { g_portable = on; }, "use the portable loops instead of AVX2 (for tests)");
}
