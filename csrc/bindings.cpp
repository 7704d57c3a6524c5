// The one pybind11 boundary of spyglass's C++ core (spyglass.engine._core).
// Arguments are checked here; the logic lives in the other .cpp files, free of pybind11.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "coalescer.h"
#include "packer.h"

namespace py = pybind11;

// ---- coalescer ----
namespace {

void check_tool_name(const std::string& tool) {
  if (tool.empty() || tool.find('\0') != std::string::npos) {
    throw py::value_error("tool name must be a non-empty string without NUL, got " +
                          py::repr(py::str(tool)).cast<std::string>());
  }
}

void check_batch_wait(const std::string& what, int64_t max_batch, double max_wait) {
  if (max_batch < 1) {
    throw py::value_error(what + "max_batch must be >= 1, got " + std::to_string(max_batch));
  }
  if (!(max_wait >= 0.0) || !std::isfinite(max_wait)) {
    throw py::value_error(what + "max_wait_s must be a finite number >= 0, got " +
                          py::str(py::float_(max_wait)).cast<std::string>());
  }
}

void check_now(double now) {
  if (!std::isfinite(now)) {
    throw py::value_error("now must be a finite time in seconds, got " +
                          py::str(py::float_(now)).cast<std::string>());
  }
}

py::tuple batch_to_tuple(spyglass::CoalescerBatch& b) {
  py::list args(b.args.size());
  for (size_t i = 0; i < b.args.size(); ++i) args[i] = py::str(b.args[i]);
  return py::make_tuple(b.id, py::str(b.tool), args);
}

py::list batches_to_list(std::vector<spyglass::CoalescerBatch>& batches) {
  py::list out(batches.size());
  for (size_t i = 0; i < batches.size(); ++i) out[i] = batch_to_tuple(batches[i]);
  return out;
}

py::dict stats_to_dict(const spyglass::CoalescerStats& s) {
  py::dict d;
  d["submitted"] = s.submitted;
  d["coalesced"] = s.coalesced;
  d["executed"] = s.executed;
  d["batches"] = s.batches;
  d["batches_by_size"] = s.batches_by_size;
  d["batches_by_wait"] = s.batches_by_wait;
  d["batches_by_flush"] = s.batches_by_flush;
  d["completed"] = s.completed;
  d["cancelled"] = s.cancelled;
  d["dropped"] = s.dropped;
  d["max_batch_size"] = s.max_batch_size;
  d["pending"] = s.pending;
  d["in_flight"] = s.in_flight;
  d["waiters"] = s.waiters;
  return d;
}

// submit/poll/cancel are sub-microsecond and hot: they keep the GIL (releasing it costs about
// as much as the work). complete/flush, per batch, release it. The core's own mutex makes the
// object safe either way (Python threads, native threads, free-threaded builds).
void bind_coalescer(py::module_& m) {
  using spyglass::CoalescerCore;
  py::class_<CoalescerCore>(m, "CoalescerCore",
                            "Deterministic, thread-safe call coalescer/batcher core (explicit "
                            "clock). Batches are (batch_id, tool, [args...]).")
      .def(py::init([](int64_t max_batch, double max_wait) {
             check_batch_wait("", max_batch, max_wait);
             return new CoalescerCore(static_cast<uint64_t>(max_batch), max_wait);
           }),
           py::arg("max_batch") = 16, py::arg("max_wait") = 0.002)
      .def(
          "set_tool_limits",
          [](CoalescerCore& c, const std::string& tool, int64_t max_batch, double max_wait) {
            check_tool_name(tool);
            check_batch_wait("tool " + tool + ": ", max_batch, max_wait);
            c.set_tool_limits(tool, static_cast<uint64_t>(max_batch), max_wait);
          },
          py::arg("tool"), py::arg("max_batch"), py::arg("max_wait"))
      .def("tool_limits", &CoalescerCore::tool_limits, py::arg("tool"))
      .def(
          "submit",
          [](CoalescerCore& c, const std::string& tool, const std::string& args, double now) {
            check_tool_name(tool);
            check_now(now);
            return c.submit(tool, args, now);
          },
          py::arg("tool"), py::arg("args"), py::arg("now"))
      .def(
          "poll",
          [](CoalescerCore& c, double now) {
            check_now(now);
            std::vector<spyglass::CoalescerBatch> ready = c.poll(now);
            return batches_to_list(ready);
          },
          py::arg("now"))
      .def("flush",
           [](CoalescerCore& c) {
             std::vector<spyglass::CoalescerBatch> ready;
             {
               py::gil_scoped_release release;
               ready = c.flush();
             }
             return batches_to_list(ready);
           })
      .def("next_deadline", &CoalescerCore::next_deadline)
      .def(
          "complete",
          [](CoalescerCore& c, int64_t batch_id) {
            if (batch_id < 1) throw py::value_error("batch id must be >= 1, got " +
                                                    std::to_string(batch_id));
            py::gil_scoped_release release;
            return c.complete(static_cast<uint64_t>(batch_id));
          },
          py::arg("batch_id"))
      .def(
          "cancel",
          [](CoalescerCore& c, int64_t ticket) {
            if (ticket < 1) return false;
            return c.cancel(static_cast<uint64_t>(ticket));
          },
          py::arg("ticket"))
      .def("stats", [](const CoalescerCore& c) { return stats_to_dict(c.stats()); });
}

}  // namespace
// ---- end coalescer ----

// ---- packer ----
namespace {

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

spyglass::PackOptions pack_options(int64_t max_tokens, int64_t min_micro_batches,
                                   int64_t multiple_of, bool allow_oversize) {
  spyglass::PackOptions o;
  o.max_tokens = max_tokens;
  o.min_micro_batches = min_micro_batches;
  o.multiple_of = multiple_of;
  o.allow_oversize = allow_oversize;
  if (max_tokens > std::numeric_limits<int32_t>::max()) {
    throw py::value_error("max_tokens must fit int32 cu_seqlens, got " +
                          std::to_string(max_tokens));
  }
  return o;
}

I64Array int_array(const py::array& a, const char* name) {
  const char kind = a.dtype().kind();
  if (a.ndim() != 1 || (kind != 'i' && kind != 'u')) {
    throw py::value_error(std::string(name) + " must be a 1-D integer array, got ndim " +
                          std::to_string(a.ndim()) + " dtype " +
                          py::str(a.dtype()).cast<std::string>());
  }
  return I64Array::ensure(a);
}

I64Array check_lengths(const py::array& lengths_in) {
  I64Array lengths = int_array(lengths_in, "lengths");
  const int64_t* p = lengths.data();
  for (py::ssize_t i = 0; i < lengths.shape(0); ++i) {
    if (p[i] > std::numeric_limits<int32_t>::max()) {
      throw py::value_error("sequence " + std::to_string(i) + " has " + std::to_string(p[i]) +
                            " tokens: more than int32 cu_seqlens can hold");
    }
  }
  return lengths;
}

py::list pack_bins_py(const py::array& lengths_in, int64_t max_tokens, int64_t min_micro_batches,
                      int64_t multiple_of, bool allow_oversize) {
  I64Array lengths = check_lengths(lengths_in);
  auto opts = pack_options(max_tokens, min_micro_batches, multiple_of, allow_oversize);
  auto bins = spyglass::pack_bins(lengths.data(), static_cast<size_t>(lengths.shape(0)), opts);
  return py::cast(bins);
}

py::list pack_py(const py::array& tokens_in, const py::array& masks_in, const py::array& lengths_in,
                 int64_t max_tokens, int64_t min_micro_batches, int64_t multiple_of,
                 bool allow_oversize) {
  I64Array lengths = check_lengths(lengths_in);
  I64Array tokens = int_array(tokens_in, "tokens");
  if (masks_in.ndim() != 1 || !masks_in.dtype().is(py::dtype::of<bool>()) ||
      !(masks_in.flags() & py::array::c_style)) {
    throw py::value_error("masks must be a contiguous 1-D bool array");
  }
  const size_t n = static_cast<size_t>(lengths.shape(0));
  std::vector<int64_t> offsets(n);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    offsets[i] = total;
    total += lengths.data()[i];
  }
  if (total != tokens.shape(0) || total != masks_in.shape(0)) {
    throw py::value_error("lengths sum to " + std::to_string(total) + " but tokens has " +
                          std::to_string(tokens.shape(0)) + " and masks " +
                          std::to_string(masks_in.shape(0)) + " elements");
  }
  auto opts = pack_options(max_tokens, min_micro_batches, multiple_of, allow_oversize);
  auto bins = spyglass::pack_bins(lengths.data(), n, opts);
  const auto* masks = static_cast<const uint8_t*>(masks_in.data());
  py::list out(bins.size());
  for (size_t b = 0; b < bins.size(); ++b) {
    int64_t t = 0;
    for (int64_t idx : bins[b]) t += lengths.data()[idx];
    const py::ssize_t nseq = static_cast<py::ssize_t>(bins[b].size());
    py::array_t<int64_t> input_ids(t), position_ids(t), seq_index(t), indices(nseq);
    py::array_t<bool> loss_mask(t);
    py::array_t<int32_t> cu_seqlens(nseq + 1);
    std::copy(bins[b].begin(), bins[b].end(), indices.mutable_data());
    const int64_t longest = spyglass::fill_micro_batch(
        bins[b], tokens.data(), masks, offsets.data(), lengths.data(), input_ids.mutable_data(),
        reinterpret_cast<uint8_t*>(loss_mask.mutable_data()), position_ids.mutable_data(),
        cu_seqlens.mutable_data(), seq_index.mutable_data());
    out[b] = py::make_tuple(input_ids, loss_mask, position_ids, cu_seqlens, seq_index, indices,
                            longest);
  }
  return out;
}

void bind_packer(py::module_& m) {
  m.def("pack_bins", &pack_bins_py, py::arg("lengths"), py::arg("max_tokens"),
        py::arg("min_micro_batches") = 1, py::arg("multiple_of") = 1,
        py::arg("allow_oversize") = false,
        "Plan micro-batches: input indices per micro-batch (see packer.cpp for the algorithm).");
  m.def("pack", &pack_py, py::arg("tokens"), py::arg("masks"), py::arg("lengths"),
        py::arg("max_tokens"), py::arg("min_micro_batches") = 1, py::arg("multiple_of") = 1,
        py::arg("allow_oversize") = false,
        "Pack flat tokens [N] int64 / masks [N] bool / lengths [n] into micro-batches: "
        "(input_ids, loss_mask, position_ids, cu_seqlens, seq_index, indices, max_seqlen).");
}

}  // namespace
// ---- end packer ----

PYBIND11_MODULE(_core, m) {
  m.doc() = "spyglass C++ core: tool-call parser, call coalescer, trajectory packer";
  m.attr("ABI_VERSION") = 1;
  bind_coalescer(m);  // ---- coalescer ----
  bind_packer(m);     // ---- packer ----
}
