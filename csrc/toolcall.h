// spyglass tool-call parser core: scans model output (<think>..</think>, <answer>/<response>,
// and tool calls framed per mode: Hermes/Qwen <tool_call>{json}</tool_call>, Llama-3 JSON,
// Mistral [TOOL_CALLS]) in one pass, parses and validates each call against its tool's JSON
// schema, and reports typed errors per call. The format, error kinds, positions and canonical
// JSON are specified in engine/toolcall.py. toolcall.cpp holds the scanner and the call-object
// rules shared by all modes; toolcall_modes.cpp the Llama-3 JSON and Mistral front-ends.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "json_scan.h"

namespace spyglass {

enum class ErrKind : uint8_t {
  UnterminatedTag,
  InvalidJson,
  TooDeep,
  TooLarge,
  InvalidCall,
  UnknownTool,
  MissingArgument,
  InvalidArgument,
};
const char* err_kind_name(ErrKind k);

// Type bits of a schema's "type".
enum : uint8_t {
  T_STRING = 1, T_INTEGER = 2, T_NUMBER = 4, T_BOOLEAN = 8, T_ARRAY = 16, T_OBJECT = 32,
  T_NULL = 64,
};

struct Schema {
  uint8_t types = 0;                    // 0: any type
  std::vector<std::string> type_names;  // in schema order, for messages
  bool has_enum = false;
  std::vector<std::string> enum_canon;  // canonical JSON of each allowed value
  std::map<std::string, Schema, std::less<>> props;
  std::vector<std::string> required;
  std::unique_ptr<Schema> items;
  bool additional = true;
};

// How tool calls are framed in the text (chosen when the parser is built).
enum class Mode : uint8_t { Hermes, Llama3Json, Mistral };

struct ToolSet {
  std::vector<std::string> names;
  std::vector<Schema> schemas;  // parallel to names; a schema with types 0 accepts anything
  std::unordered_map<std::string_view, size_t> index;  // views into `names` (build it last)
  int max_depth = 64;
  size_t max_call_bytes = 1 << 20;
  Mode mode = Mode::Hermes;
};

// [off, off+len) in ParseOut::store.
struct Slice {
  uint32_t off = 0, len = 0;
};

struct CallRec {
  int64_t index;
  Slice name, arguments;
  uint64_t start, end;
};

struct ErrRec {
  int64_t index;  // ordinal of the call in the text, -1 for think/answer tag errors
  ErrKind kind;
  Slice message;
  uint64_t byte_pos, start, end;
};

// One text's result; all its strings live in one arena (`store`). think/answer/outside are raw
// bytes (decoded with U+FFFD replacement when handed to Python); names, arguments and messages
// are valid UTF-8.
struct ParseOut {
  std::string store;
  std::vector<CallRec> calls;
  std::vector<ErrRec> errors;
  Slice think, answer, outside;
  bool has_think = false;
  int answer_tag = 0;  // 0 none, 1 <answer>, 2 <response>
  const char* data(Slice s) const { return store.data() + s.off; }
  Slice put(const char* p, size_t n) {
    Slice s{static_cast<uint32_t>(store.size()), static_cast<uint32_t>(n)};
    store.append(p, n);
    return s;
  }
  Slice put(const std::string& v) { return put(v.data(), v.size()); }
};

// Tags and tag matching shared by the scanner's front-ends.
namespace tags {
constexpr char kThinkO[] = "<think>";
constexpr char kThinkC[] = "</think>";
constexpr char kCallO[] = "<tool_call>";
constexpr char kCallC[] = "</tool_call>";
constexpr char kAnsO[] = "<answer>";
constexpr char kAnsC[] = "</answer>";
constexpr char kRespO[] = "<response>";
constexpr char kRespC[] = "</response>";
constexpr char kPyTag[] = "<|python_tag|>";
constexpr char kToolCalls[] = "[TOOL_CALLS]";
constexpr char kArgs[] = "[ARGS]";
constexpr char kCallId[] = "[CALL_ID]";

template <size_t N>
constexpr size_t len(const char (&)[N]) {
  return N - 1;
}

// 1: `tag` starts at buf[q]; 0: it does not; -1: buf ends inside a prefix of `tag`.
template <size_t N>
inline int match(const char* buf, size_t n, size_t q, const char (&tag)[N]) {
  size_t avail = n - q, l = N - 1;
  if (avail >= l) return std::memcmp(buf + q, tag, l) == 0 ? 1 : 0;
  return std::memcmp(buf + q, tag, avail) == 0 ? -1 : 0;
}

inline bool is_ws(char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; }
}  // namespace tags

// Resumable single-pass scanner. run() may be called repeatedly on a growing buffer (streaming);
// it never looks back before its saved position except to copy out completed blocks.
class Scanner {
 public:
  explicit Scanner(const ToolSet* tools) : tools_(tools) {}
  // Forgets the text state (keeps the buffers) so the scanner can parse a new text.
  void reset();
  // Scans buf[0, n) from the saved position. With final=false it stops before anything that
  // later bytes could change (a possibly split tag). New calls/errors are appended to out.
  void run(const char* buf, size_t n, bool final, ParseOut& out);

 private:
  // Outside: text; Think/Answer: inside a block; Call: a Hermes <tool_call> body; Lead: blanks
  // after <|python_tag|> / [TOOL_CALLS] / [ARGS]; Name: a Mistral v11 name (and call id);
  // Value: a lexically delimited JSON value (Llama / Mistral); Sep: Llama's "; " between calls.
  enum class St { Outside, Think, Answer, Call, Lead, Name, Value, Sep };
  void outside(const char* buf, size_t n, bool final, ParseOut& out, bool& wait);
  int tag_at(const char* buf, size_t n, size_t q, bool final);
  void open_block(size_t q);
  void block(const char* buf, size_t n, bool final, ParseOut& out, bool& wait);
  void call(const char* buf, size_t n, bool final, ParseOut& out, bool& wait);
  void finish_call(const char* buf, size_t body_end, size_t span_end, ParseOut& out);
  void emit_block(uint32_t root, size_t span_end, ParseOut& out);
  void one_call(uint32_t node, int depth, size_t span_end, ParseOut& out);
  void finish_args(std::string_view name, size_t name_pos, int64_t args, uint32_t empty_pos,
                   const char* key, int depth, size_t span_end, ParseOut& out);
  bool validate(const JDoc& d, uint32_t node, const Schema& sc, std::string& msg, ErrKind& kind,
                size_t& pos);
  void push_error(ParseOut& out, ErrKind kind, const std::string& msg, size_t pos, size_t start,
                  size_t end, int64_t index);
  void finalize(ParseOut& out);
  // toolcall_modes.cpp
  void outside_alt(const char* buf, size_t n, bool final, bool& wait);
  void add_outside(const char* p, size_t len);
  void lead(const char* buf, size_t n, bool final, bool& wait);
  void name(const char* buf, size_t n, bool final, ParseOut& out, bool& wait);
  void begin_value(size_t at, bool args);
  int opener_at(const char* buf, size_t n, size_t p);
  void value(const char* buf, size_t n, bool final, ParseOut& out, bool& wait);
  void finish_value(const char* buf, size_t end, ParseOut& out);
  void sep(const char* buf, size_t n, bool final, bool& wait);

  const ToolSet* tools_;
  JDoc doc_, sdoc_;  // sdoc_: the document inside an "arguments" JSON string
  JError jerr_;
  std::string canon_, msg_, think_, outside_, sbuf_;
  bool has_think_ = false;
  std::vector<std::string> path_;  // canonical JSON of each path element
  St st_ = St::Outside;
  size_t p_ = 0, tag_start_ = 0, body_ = 0;
  // Hermes call: first / last literal </tool_call> after the body start (kNone: none yet), the
  // search frontier, and xl_ when the body was last parsed (streaming).
  static constexpr size_t kNone = ~size_t{0};
  size_t c1_ = kNone, xl_ = kNone, find_ = 0, parsed_xl_ = kNone;
  // Streaming, a call whose last parse ended inside a string: where that parse ended (grown over
  // plain string bytes since, kNone: not pending), the body length it parsed, how many parses.
  size_t pend_to_ = kNone, pend_len_ = 0;
  int pend_parses_ = 0;
  int block_tag_ = 0;  // Think: 0; Answer: 1 answer, 2 response
  bool seen_block_ = false, in_str_ = false;  // in_str_: Value lexer
  int64_t calls_seen_ = 0, cur_index_ = 0;
  // Llama / Mistral front-ends
  bool outside_blank_ = true;   // text_outside so far is only " \t\n\r"
  bool lead_args_ = false;      // Lead: before a Mistral [ARGS] value (else after the opener)
  bool val_args_ = false;       // Value: a Mistral v11 arguments value (else a call block)
  bool in_id_ = false;          // Name: past [CALL_ID]
  bool semi_ = false;           // Sep: the ';' has been seen
  size_t val_start_ = 0, depth_ = 0, name_start_ = 0, name_end_ = 0, q_ = 0;
  // Value: esc_ after a backslash in a string; open_at_: the first opener of a next block inside
  // the lexical extent (kNone: none yet); try_n_: the buffer size at which a pending parse is
  // retried; semi_at_ / semi_q_: a llama ';' at the buffer end and the blanks scanned after it.
  bool esc_ = false;
  size_t open_at_ = kNone, try_n_ = 0, semi_at_ = kNone, semi_q_ = 0;
};

// One-shot parse of a whole text.
void parse_text(Scanner& scanner, const char* text, size_t n, ParseOut& out);

}  // namespace spyglass
