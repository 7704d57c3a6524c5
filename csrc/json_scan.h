// JSON scanner of spyglass's tool-call parser: parses one JSON value from a byte range into a
// reusable flat node arena and writes its canonical form. No exceptions, no per-value allocation
// once the arena has grown. The exact grammar, error positions and canonical form are specified
// in engine/toolcall.py (module docstring) and mirrored byte for byte by engine/toolcall_ref.py.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace spyglass {

enum class JKind : uint8_t { Null, False, True, Int, Num, Str, Arr, Obj };

// One JSON value. `pos` is the absolute byte offset of its first byte in the scanned text.
//   Str / Int / Num: bytes[a, a+n) is the decoded UTF-8 string / canonical number text; for a
//        string with `raw` set (no escapes in the source) it is text[a, a+n) instead.
//   Arr: kids[a, a+n) are the element node ids.
//   Obj: kids[a, a+2n) are (key node, value node) pairs, sorted by key bytes, duplicates removed
//        (the last occurrence wins).
struct JNode {
  JKind kind;
  bool raw;
  uint32_t pos;
  uint32_t a;
  uint32_t n;
};

struct JError {
  bool too_deep = false;  // true: nesting limit; false: syntax error (kind invalid_json)
  // The input ended inside a string (plain bytes, not an escape): more bytes could continue it.
  bool in_string_end = false;
  std::string message;
  size_t pos = 0;
};

class JDoc {
 public:
  std::vector<JNode> nodes;
  std::vector<uint32_t> kids;
  std::string bytes;

  // Parses exactly one JSON value (surrounded by optional whitespace) from text[begin, end).
  // On success sets `root` and returns true; on failure fills `err` and returns false.
  // `depth0` is the nesting depth the value sits at (its own arrays/objects count from
  // depth0 + 1 against max_depth).
  bool parse(const char* text, size_t begin, size_t end, int max_depth, JError& err,
             uint32_t& root, int depth0 = 0);
  // Parses one JSON value starting at text[begin] (after optional whitespace) that ends before
  // `end`; sets `value_end` to the byte after it. Bytes after the value are not examined.
  // `depth0` as in parse().
  bool parse_prefix(const char* text, size_t begin, size_t end, int max_depth, JError& err,
                    uint32_t& root, size_t& value_end, int depth0 = 0);
  // Appends the canonical serialisation of `node` to `out`.
  void canonical(uint32_t node, std::string& out) const;
  // Value node of member `key` of object `obj`, or -1.
  int64_t member(uint32_t obj, const char* key, size_t key_len) const;
  // Appends a new empty-object node at `pos` and returns its id.
  uint32_t add_empty_object(uint32_t pos);
  const char* data(const JNode& nd) const { return (nd.raw ? src_ : bytes.data()) + nd.a; }
  const char* str_data(uint32_t node) const { return data(nodes[node]); }

 private:
  friend struct JParser;
  const char* src_ = nullptr;
  std::vector<uint32_t> scratch_;
  std::vector<uint32_t> order_;
  std::string digits_;
};

// Appends the canonical JSON string literal (with quotes) for UTF-8 bytes s[0, n) to `out`.
void append_json_string(const char* s, size_t n, std::string& out);
// End of the run of plain string bytes from s[p] (printable ASCII other than '"' and '\\'), at
// most `end`: a string that is open at p is still open, with nothing to check, at that point.
size_t json_plain_run(const char* s, size_t p, size_t end);
// True if s[0, n) is well-formed UTF-8 (Unicode Table 3-7).
bool valid_utf8(const char* s, size_t n);
// Type name of a node as used in error messages: string, integer, number, boolean, null, array,
// object.
const char* jkind_name(JKind k);

}  // namespace spyglass
