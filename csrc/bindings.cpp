// The one pybind11 boundary of spyglass's C++ core (spyglass.engine._core).
#include <pybind11/pybind11.h>
namespace py = pybind11;
PYBIND11_MODULE(_core, m) {
  m.doc() = "spyglass C++ core: tool-call parser, call coalescer, trajectory packer";
  m.attr("ABI_VERSION") = 1;
}
