// The one pybind11 boundary of spyglass's C++ core (spyglass.engine._core).
// Arguments are checked here; the logic lives in the other .cpp files, free of pybind11.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <memory>
#include <new>
#include <thread>
#include <utility>

#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "coalescer.h"
#include "packer.h"
#include "toolcall.h"

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

// ==================================================================================
// BEGIN tool-call parser bindings (Parser, StreamParser, ParseResult, ToolCall, CallError)
// ==================================================================================
namespace spyglass {
namespace {

constexpr int kMaxDepthLimit = 512;
constexpr size_t kMaxTextBytes = 0xFFFFFFF0u;  // positions are 32-bit inside the JSON arena

py::str decode_replace(const std::string& s) {
  PyObject* o = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "replace");
  if (!o) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(o);
}

py::str utf8_str(const std::string& s) {  // bytes known to be valid UTF-8
  return decode_replace(s);
}

// A text argument (str or bytes) as a byte view. A str's UTF-8 is the interpreter's cached
// encoding; a str holding lone surrogates is encoded with "surrogatepass" (the parser then sees
// ill-formed UTF-8). `keep` owns whatever the view points into.
void text_view(py::handle h, py::object& keep, const char*& data, size_t& size, long index) {
  if (PyUnicode_Check(h.ptr())) {
    Py_ssize_t n;
    const char* d = PyUnicode_AsUTF8AndSize(h.ptr(), &n);
    if (d) {
      keep = py::reinterpret_borrow<py::object>(h);
      data = d;
      size = static_cast<size_t>(n);
    } else {
      PyErr_Clear();
      PyObject* b = PyUnicode_AsEncodedString(h.ptr(), "utf-8", "surrogatepass");
      if (!b) throw py::error_already_set();
      keep = py::reinterpret_steal<py::object>(b);
      data = PyBytes_AS_STRING(b);
      size = static_cast<size_t>(PyBytes_GET_SIZE(b));
    }
  } else if (PyBytes_Check(h.ptr())) {
    keep = py::reinterpret_borrow<py::object>(h);
    data = PyBytes_AS_STRING(h.ptr());
    size = static_cast<size_t>(PyBytes_GET_SIZE(h.ptr()));
  } else {
    std::string where = index >= 0 ? "texts[" + std::to_string(index) + "]" : "text";
    throw py::type_error(where + " must be str or bytes, got " +
                         std::string(Py_TYPE(h.ptr())->tp_name));
  }
  if (size > kMaxTextBytes)
    throw py::value_error("text of " + std::to_string(size) + " bytes exceeds the 4 GiB limit");
}

Schema schema_from_py(py::handle h, const std::string& where) {
  Schema sc;
  if (h.is_none()) return sc;
  if (!py::isinstance<py::dict>(h))
    throw py::type_error(where + ": normalized schema must be a dict, got " +
                         std::string(py::str(py::type::of(h))));
  py::dict d = py::reinterpret_borrow<py::dict>(h);
  static const std::pair<const char*, uint8_t> kTypes[] = {
      {"string", T_STRING}, {"integer", T_INTEGER}, {"number", T_NUMBER},
      {"boolean", T_BOOLEAN}, {"array", T_ARRAY}, {"object", T_OBJECT}, {"null", T_NULL}};
  for (py::handle t : py::list(d["types"])) {
    std::string name = py::cast<std::string>(t);
    uint8_t bit = 0;
    for (const auto& kt : kTypes)
      if (name == kt.first) bit = kt.second;
    if (!bit) throw py::value_error(where + ": unknown JSON schema type '" + name + "'");
    sc.types |= bit;
    sc.type_names.push_back(name);
  }
  if (!d["enum"].is_none()) {
    sc.has_enum = true;
    sc.enum_canon = py::cast<std::vector<std::string>>(d["enum"]);
  }
  for (auto kv : py::dict(d["properties"])) {
    std::string key = py::cast<std::string>(kv.first);
    sc.props.emplace(key, schema_from_py(kv.second, where + "." + key));
  }
  sc.required = py::cast<std::vector<std::string>>(d["required"]);
  if (!d["items"].is_none())
    sc.items = std::make_unique<Schema>(schema_from_py(d["items"], where + "[]"));
  sc.additional = py::cast<bool>(d["additional"]);
  return sc;
}

Mode mode_from_py(const std::string& mode) {
  if (mode == "hermes") return Mode::Hermes;
  if (mode == "llama3_json") return Mode::Llama3Json;
  if (mode == "mistral") return Mode::Mistral;
  throw py::value_error("mode must be 'hermes', 'llama3_json' or 'mistral', got " +
                        py::repr(py::str(mode)).cast<std::string>());
}

std::shared_ptr<ToolSet> toolset_from_py(py::list tools, int max_depth, long long max_call_bytes,
                                         const std::string& mode) {
  if (max_depth < 1 || max_depth > kMaxDepthLimit)
    throw py::value_error("max_depth must be in [1, " + std::to_string(kMaxDepthLimit) +
                          "], got " + std::to_string(max_depth));
  if (max_call_bytes < 1 || static_cast<unsigned long long>(max_call_bytes) > kMaxTextBytes)
    throw py::value_error("max_call_bytes must be in [1, 2**32), got " +
                          std::to_string(max_call_bytes));
  auto ts = std::make_shared<ToolSet>();
  ts->mode = mode_from_py(mode);
  ts->max_depth = max_depth;
  ts->max_call_bytes = static_cast<size_t>(max_call_bytes);
  for (py::handle item : tools) {
    py::tuple t = py::cast<py::tuple>(item);
    if (t.size() != 2) throw py::value_error("each tool must be a (name, schema) pair");
    std::string name = py::cast<std::string>(t[0]);
    for (const std::string& seen : ts->names)
      if (seen == name) throw py::value_error("duplicate tool name '" + name + "'");
    ts->names.push_back(name);
    ts->schemas.push_back(schema_from_py(t[1], "tool '" + name + "'"));
  }
  for (size_t i = 0; i < ts->names.size(); ++i) ts->index.emplace(ts->names[i], i);
  return ts;
}

py::tuple span_of(uint64_t a, uint64_t b) { return py::make_tuple(a, b); }

// What Python sees of one call / error: standalone copies out of a ParseOut's arena.
struct PyCall {
  int64_t index;
  std::string name, arguments;
  uint64_t start, end;
};
struct PyErr {
  int64_t index;
  ErrKind kind;
  std::string message;
  uint64_t byte_pos, start, end;
};

PyCall py_call(const ParseOut& r, const CallRec& c) {
  return PyCall{c.index, std::string(r.data(c.name), c.name.len),
                std::string(r.data(c.arguments), c.arguments.len), c.start, c.end};
}
PyErr py_err(const ParseOut& r, const ErrRec& e) {
  return PyErr{e.index, e.kind, std::string(r.data(e.message), e.message.len), e.byte_pos,
               e.start, e.end};
}
py::str decode_slice(const ParseOut& r, Slice s) {
  PyObject* o = PyUnicode_DecodeUTF8(r.data(s), static_cast<Py_ssize_t>(s.len), "replace");
  if (!o) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(o);
}
py::list calls_of(const ParseOut& r) {
  py::list l(r.calls.size());
  for (size_t i = 0; i < r.calls.size(); ++i) l[i] = py::cast(py_call(r, r.calls[i]));
  return l;
}
py::list errors_of(const ParseOut& r) {
  py::list l(r.errors.size());
  for (size_t i = 0; i < r.errors.size(); ++i) l[i] = py::cast(py_err(r, r.errors[i]));
  return l;
}

py::dict call_dict(const PyCall& c) {
  py::dict d;
  d["index"] = c.index;
  d["name"] = utf8_str(c.name);
  d["arguments"] = utf8_str(c.arguments);
  d["span"] = span_of(c.start, c.end);
  return d;
}

py::dict error_dict(const PyErr& e) {
  py::dict d;
  d["index"] = e.index;
  d["kind"] = err_kind_name(e.kind);
  d["message"] = utf8_str(e.message);
  d["byte_pos"] = e.byte_pos;
  d["span"] = span_of(e.start, e.end);
  return d;
}

py::object opt_text(const ParseOut& r, bool has, Slice s) {
  return has ? py::object(decode_slice(r, s)) : py::object(py::none());
}

py::object answer_tag(const ParseOut& r) {
  if (r.answer_tag == 0) return py::none();
  return py::str(r.answer_tag == 1 ? "answer" : "response");
}

py::dict result_dict(const ParseOut& r) {
  py::dict d;
  py::list calls, errors;
  for (const CallRec& c : r.calls) calls.append(call_dict(py_call(r, c)));
  for (const ErrRec& e : r.errors) errors.append(error_dict(py_err(r, e)));
  d["calls"] = calls;
  d["errors"] = errors;
  d["answer"] = opt_text(r, r.answer_tag != 0, r.answer);
  d["answer_tag"] = answer_tag(r);
  d["think"] = opt_text(r, r.has_think, r.think);
  d["text_outside"] = decode_slice(r, r.outside);
  return d;
}

// ParseResult is a plain CPython type rather than a pybind11 class: pybind11 registers every
// instance in a global hash map, which cost about a fifth of a batch parse.
// The ParseOut lives inside the Python object (placement-new), one allocation per result.
struct ResultObject {
  PyObject_HEAD
  ParseOut r;
};
PyTypeObject* g_result_type = nullptr;

const ParseOut& res_of(PyObject* self) { return reinterpret_cast<ResultObject*>(self)->r; }

template <typename F>
PyObject* guarded(F f) {
  try {
    return f().release().ptr();
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

py::object res_calls(const ParseOut& r) { return calls_of(r); }
py::object res_errors(const ParseOut& r) { return errors_of(r); }
py::object res_answer(const ParseOut& r) { return opt_text(r, r.answer_tag != 0, r.answer); }
py::object res_think(const ParseOut& r) { return opt_text(r, r.has_think, r.think); }
py::object res_outside(const ParseOut& r) { return decode_slice(r, r.outside); }
py::object res_ok(const ParseOut& r) { return py::bool_(r.errors.empty()); }

template <py::object (*F)(const ParseOut&)>
PyObject* res_get(PyObject* self, void*) {
  return guarded([&] { return F(res_of(self)); });
}

PyObject* res_to_dict(PyObject* self, PyObject*) {
  return guarded([&] { return py::object(result_dict(res_of(self))); });
}

PyObject* res_repr(PyObject* self) {
  return guarded([&] {
    const ParseOut& r = res_of(self);
    return py::object(py::str("ParseResult(calls=" + std::to_string(r.calls.size()) +
                              ", errors=" + std::to_string(r.errors.size()) + ", answer_tag=" +
                              std::string(py::repr(answer_tag(r))) + ")"));
  });
}

void res_dealloc(PyObject* self) {
  reinterpret_cast<ResultObject*>(self)->r.~ParseOut();
  PyTypeObject* tp = Py_TYPE(self);
  tp->tp_free(self);
  Py_DECREF(tp);
}

PyGetSetDef g_res_getset[] = {
    {"calls", res_get<res_calls>, nullptr, "list[ToolCall], in text order", nullptr},
    {"errors", res_get<res_errors>, nullptr, "list[CallError], in text order", nullptr},
    {"answer", res_get<res_answer>, nullptr, "first <answer>/<response> text or None", nullptr},
    {"answer_tag", res_get<answer_tag>, nullptr, "'answer', 'response' or None", nullptr},
    {"think", res_get<res_think>, nullptr, "think blocks joined by newlines, or None", nullptr},
    {"text_outside", res_get<res_outside>, nullptr, "text outside all blocks", nullptr},
    {"ok", res_get<res_ok>, nullptr, "True when there are no errors", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};
PyMethodDef g_res_methods[] = {
    {"to_dict", res_to_dict, METH_NOARGS, "all fields as plain Python values"},
    {nullptr, nullptr, 0, nullptr}};

void init_result_type(py::module_& m) {
  static PyType_Slot slots[] = {
      {Py_tp_dealloc, reinterpret_cast<void*>(res_dealloc)},
      {Py_tp_repr, reinterpret_cast<void*>(res_repr)},
      {Py_tp_getset, g_res_getset},
      {Py_tp_methods, g_res_methods},
      {Py_tp_doc, const_cast<char*>("Everything parsed from one model output.")},
      {0, nullptr}};
  static PyType_Spec spec = {"spyglass.engine._core.ParseResult", sizeof(ResultObject), 0,
                             Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION, slots};
  PyObject* t = PyType_FromSpec(&spec);
  if (!t) throw py::error_already_set();
  g_result_type = reinterpret_cast<PyTypeObject*>(t);  // one reference kept for the process
  m.add_object("ParseResult", py::reinterpret_borrow<py::object>(t));
}

// A new ParseResult holding an empty ParseOut, and a pointer to fill it (also without the GIL).
py::object new_result(ParseOut*& out) {
  PyObject* o = g_result_type->tp_alloc(g_result_type, 0);
  if (!o) throw py::error_already_set();
  out = new (&reinterpret_cast<ResultObject*>(o)->r) ParseOut();
  return py::reinterpret_steal<py::object>(o);
}

class Parser {
 public:
  Parser(py::list tools, int max_depth, long long max_call_bytes, const std::string& mode)
      : tools_(toolset_from_py(tools, max_depth, max_call_bytes, mode)), scanner_(tools_.get()) {}

  py::object parse(py::handle text) {
    py::object keep;
    const char* data;
    size_t size;
    text_view(text, keep, data, size, -1);
    ParseOut* out;
    py::object res = new_result(out);
    if (size >= (1u << 16)) {  // long text: release the GIL (own scanner: no shared state)
      py::gil_scoped_release nogil;
      Scanner sc(tools_.get());
      parse_text(sc, data, size, *out);
    } else {
      parse_text(scanner_, data, size, *out);
    }
    return res;
  }

  py::list parse_batch(py::iterable texts, long threads) {
    if (threads < 0) throw py::value_error("threads must be >= 0, got " + std::to_string(threads));
    // A tuple snapshot owns every text while the GIL is released.
    py::tuple items = py::reinterpret_steal<py::tuple>(PySequence_Tuple(texts.ptr()));
    if (!items) throw py::error_already_set();
    size_t n = items.size();
    std::vector<py::object> keep;  // encodings of strs holding lone surrogates
    std::vector<std::pair<const char*, size_t>> views(n);
    for (size_t i = 0; i < n; ++i) {
      PyObject* o = PyTuple_GET_ITEM(items.ptr(), static_cast<Py_ssize_t>(i));
      Py_ssize_t len;
      const char* d = PyUnicode_Check(o) ? PyUnicode_AsUTF8AndSize(o, &len) : nullptr;
      if (d && static_cast<size_t>(len) <= kMaxTextBytes) {
        views[i] = {d, static_cast<size_t>(len)};
        continue;
      }
      if (!d && PyErr_Occurred()) PyErr_Clear();
      keep.emplace_back();
      text_view(o, keep.back(), views[i].first, views[i].second, static_cast<long>(i));
    }
    py::list res(n);
    std::vector<ParseOut*> outs(n);
    for (size_t i = 0; i < n; ++i)
      PyList_SET_ITEM(res.ptr(), static_cast<Py_ssize_t>(i), new_result(outs[i]).release().ptr());
    {
      py::gil_scoped_release nogil;
      run_batch(views, outs, static_cast<size_t>(threads));
    }
    return res;
  }

  std::shared_ptr<ToolSet> tools() const { return tools_; }

 private:
  void run_batch(const std::vector<std::pair<const char*, size_t>>& views,
                 const std::vector<ParseOut*>& outs, size_t threads) {
    if (threads <= 1 || views.size() < 2) {
      Scanner sc(tools_.get());
      for (size_t i = 0; i < views.size(); ++i) {
        parse_text(sc, views[i].first, views[i].second, *outs[i]);
      }
      return;
    }
    if (threads > views.size()) threads = views.size();
    std::atomic<size_t> next{0};
    constexpr size_t kChunk = 32;
    auto work = [&]() {
      Scanner sc(tools_.get());
      for (;;) {
        size_t b = next.fetch_add(kChunk);
        if (b >= views.size()) return;
        size_t e = std::min(views.size(), b + kChunk);
        for (size_t i = b; i < e; ++i) {
          parse_text(sc, views[i].first, views[i].second, *outs[i]);
        }
      }
    };
    std::vector<std::thread> pool;
    for (size_t t = 1; t < threads; ++t) pool.emplace_back(work);
    work();
    for (std::thread& t : pool) t.join();
  }

  std::shared_ptr<ToolSet> tools_;
  Scanner scanner_;
};

class StreamParser {
 public:
  explicit StreamParser(std::shared_ptr<ToolSet> tools)
      : tools_(std::move(tools)), scanner_(tools_.get()) {}

  py::list feed(py::handle chunk) {
    if (finished_) throw py::value_error("feed() after finish(): this stream is closed");
    py::object keep;
    const char* data;
    size_t size;
    text_view(chunk, keep, data, size, -1);
    if (buf_.size() + size > kMaxTextBytes)
      throw py::value_error("stream exceeds the 4 GiB limit");
    buf_.append(data, size);
    scanner_.run(buf_.data(), buf_.size(), false, out_);
    return drain();
  }

  py::object finish() {
    if (!finished_) {
      scanner_.run(buf_.data(), buf_.size(), true, out_);
      finished_ = true;
    }
    ParseOut* out;
    py::object res = new_result(out);
    *out = out_;
    return res;
  }

 private:
  // New calls and call errors since the last drain, in call-index order.
  py::list drain() {
    py::list res;
    size_t& c = sent_calls_;
    size_t& e = sent_errors_;
    while (c < out_.calls.size() || e < out_.errors.size()) {
      bool take_call = e >= out_.errors.size() ||
                       (c < out_.calls.size() && out_.calls[c].index < out_.errors[e].index);
      if (take_call)
        res.append(py::cast(py_call(out_, out_.calls[c++])));
      else
        res.append(py::cast(py_err(out_, out_.errors[e++])));
    }
    return res;
  }

  std::shared_ptr<ToolSet> tools_;
  Scanner scanner_;
  std::string buf_;
  ParseOut out_;
  size_t sent_calls_ = 0, sent_errors_ = 0;
  bool finished_ = false;
};

std::string call_repr(const PyCall& c) {
  return "ToolCall(index=" + std::to_string(c.index) + ", name=" +
         std::string(py::repr(utf8_str(c.name))) + ", arguments=" +
         std::string(py::repr(utf8_str(c.arguments))) + ", span=(" + std::to_string(c.start) +
         ", " + std::to_string(c.end) + "))";
}

std::string error_repr(const PyErr& e) {
  return "CallError(index=" + std::to_string(e.index) + ", kind='" + err_kind_name(e.kind) +
         "', message=" + std::string(py::repr(utf8_str(e.message))) +
         ", byte_pos=" + std::to_string(e.byte_pos) + ", span=(" + std::to_string(e.start) +
         ", " + std::to_string(e.end) + "))";
}

void bind_toolcall(py::module_& m) {
  py::class_<PyCall>(m, "ToolCall", "A well-formed, validated tool call.")
      .def_readonly("index", &PyCall::index,
                    "ordinal of the call in the text (each element of a list counts)")
      .def_property_readonly("name", [](const PyCall& c) { return utf8_str(c.name); })
      .def_property_readonly("arguments", [](const PyCall& c) { return utf8_str(c.arguments); },
                             "canonical JSON of the arguments object")
      .def_property_readonly("span", [](const PyCall& c) { return span_of(c.start, c.end); },
                             "UTF-8 byte span [start, end) of the whole <tool_call> block")
      .def("args", [](const PyCall& c) {
        return py::module_::import("spyglass.engine.toolcall")
            .attr("load_arguments")(utf8_str(c.arguments));
      }, "the arguments as a dict (json.loads of `arguments`; integers beyond Python's "
         "int-string limit as decimal.Decimal)")
      .def("to_dict", &call_dict)
      .def("__eq__", [](const PyCall& a, py::object b) {
        if (!py::isinstance<PyCall>(b)) return false;
        const PyCall& o = py::cast<const PyCall&>(b);
        return a.index == o.index && a.name == o.name && a.arguments == o.arguments &&
               a.start == o.start && a.end == o.end;
      })
      .def("__repr__", &call_repr);
  py::class_<PyErr>(m, "CallError", "A typed error of one tool call (or of a think/answer tag).")
      .def_readonly("index", &PyErr::index, "ordinal of its call in the text, -1 for a tag error")
      .def_property_readonly("kind", [](const PyErr& e) { return err_kind_name(e.kind); })
      .def_property_readonly("message", [](const PyErr& e) { return utf8_str(e.message); })
      .def_readonly("byte_pos", &PyErr::byte_pos, "UTF-8 byte offset of the offending byte")
      .def_property_readonly("span", [](const PyErr& e) { return span_of(e.start, e.end); })
      .def("to_dict", &error_dict)
      .def("__eq__", [](const PyErr& a, py::object b) {
        if (!py::isinstance<PyErr>(b)) return false;
        const PyErr& o = py::cast<const PyErr&>(b);
        return a.index == o.index && a.kind == o.kind && a.message == o.message &&
               a.byte_pos == o.byte_pos && a.start == o.start && a.end == o.end;
      })
      .def("__repr__", &error_repr);
  init_result_type(m);
  py::class_<StreamParser>(m, "StreamParser", "Incremental parser over chunks of one output.")
      .def("feed", &StreamParser::feed, py::arg("chunk"))
      .def("finish", &StreamParser::finish);
  py::class_<Parser>(m, "Parser", "Tool-call parser bound to a set of normalized tool schemas.")
      .def(py::init<py::list, int, long long, const std::string&>(), py::arg("tools"),
           py::arg("max_depth"), py::arg("max_call_bytes"), py::arg("mode") = "hermes")
      .def_property_readonly("mode", [](const Parser& p) {
        static const char* const kNames[] = {"hermes", "llama3_json", "mistral"};
        return std::string(kNames[static_cast<int>(p.tools()->mode)]);
      }, "how tool calls are framed: 'hermes', 'llama3_json' or 'mistral'")
      .def("parse", &Parser::parse, py::arg("text"))
      .def("parse_batch", &Parser::parse_batch, py::arg("texts"), py::arg("threads") = 0)
      .def("stream", [](const Parser& p) { return StreamParser(p.tools()); });
}

}  // namespace
}  // namespace spyglass
// ==================================================================================
// END tool-call parser bindings
// ==================================================================================

PYBIND11_MODULE(_core, m) {
  m.doc() = "spyglass C++ core: tool-call parser, call coalescer, trajectory packer";
  m.attr("ABI_VERSION") = 1;
  bind_coalescer(m);  // ---- coalescer ----
  bind_packer(m);     // ---- packer ----
  spyglass::bind_toolcall(m);  // ---- tool-call parser ----
}
