// spyglass tool-call parser core: scans Qwen/Hermes-format model output
// (<think>..</think>, <tool_call>{json}</tool_call>, <answer>/<response>) in one pass, parses
// and validates each call against its tool's JSON schema, and reports typed errors per call.
// The format, error kinds, positions and canonical JSON are specified in engine/toolcall.py.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
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
  std::map<std::string, Schema> props;
  std::vector<std::string> required;
  std::unique_ptr<Schema> items;
  bool additional = true;
};

struct ToolSet {
  std::vector<std::string> names;
  std::vector<Schema> schemas;  // parallel to names; a schema with types 0 accepts anything
  std::unordered_map<std::string, size_t> index;
  int max_depth = 64;
  size_t max_call_bytes = 1 << 20;
};

struct CallRec {
  int64_t index;
  std::string name;
  std::string arguments;
  uint64_t start, end;
};

struct ErrRec {
  int64_t index;  // ordinal of the <tool_call> block, -1 for think/answer tag errors
  ErrKind kind;
  std::string message;
  uint64_t byte_pos, start, end;
};

// One text's result. think/answer/outside hold raw bytes (decoded with U+FFFD replacement when
// handed to Python).
struct ParseOut {
  std::vector<CallRec> calls;
  std::vector<ErrRec> errors;
  std::string think;
  bool has_think = false;
  std::string answer;
  int answer_tag = 0;  // 0 none, 1 <answer>, 2 <response>
  std::string outside;
};

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
  enum class St { Outside, Think, Answer, Call };
  void outside(const char* buf, size_t n, bool final, ParseOut& out, bool& wait);
  void block(const char* buf, size_t n, bool final, ParseOut& out, bool& wait);
  void call(const char* buf, size_t n, bool final, ParseOut& out, bool& wait);
  void finish_call(const char* buf, size_t body_end, size_t span_end, ParseOut& out);
  bool validate(uint32_t node, const Schema& sc, ErrRec& e);

  const ToolSet* tools_;
  JDoc doc_;
  JError jerr_;
  std::string canon_;
  std::vector<std::string> path_;  // canonical JSON of each path element
  St st_ = St::Outside;
  size_t p_ = 0, tag_start_ = 0, body_ = 0;
  int block_tag_ = 0;  // Think: 0; Answer: 1 answer, 2 response
  bool seen_block_ = false, in_str_ = false;
  int64_t calls_seen_ = 0, cur_index_ = 0;
};

// One-shot parse of a whole text.
void parse_text(Scanner& scanner, const char* text, size_t n, ParseOut& out);

}  // namespace spyglass
