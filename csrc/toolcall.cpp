// Tool-call scanner and validator (see toolcall.h; the format is specified in
// engine/toolcall.py). One forward pass: memchr for '<' outside calls, a quote/backslash lexer
// inside calls to find the closing tag, then one JSON parse of the call body.
#include "toolcall.h"

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace spyglass {
namespace {

constexpr char kThinkO[] = "<think>";
constexpr char kThinkC[] = "</think>";
constexpr char kCallO[] = "<tool_call>";
constexpr char kCallC[] = "</tool_call>";
constexpr char kAnsO[] = "<answer>";
constexpr char kAnsC[] = "</answer>";
constexpr char kRespO[] = "<response>";
constexpr char kRespC[] = "</response>";

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

// Lexer classes inside a call body: bit 1 = '"' or '<' (outside strings), bit 2 = '"' or '\\'.
struct LexClass {
  uint8_t t[256];
  constexpr LexClass() : t() {
    t[static_cast<uint8_t>('"')] = 3;
    t[static_cast<uint8_t>('<')] = 1;
    t[static_cast<uint8_t>('\\')] = 2;
  }
};
constexpr LexClass kLex{};

std::string path_string(const std::vector<std::string>& path) {
  std::string s = "[";
  for (size_t i = 0; i < path.size(); ++i) {
    if (i) s.push_back(',');
    s += path[i];
  }
  s.push_back(']');
  return s;
}

uint8_t kind_bits(JKind k) {
  switch (k) {
    case JKind::Null: return T_NULL;
    case JKind::False:
    case JKind::True: return T_BOOLEAN;
    case JKind::Int: return T_INTEGER | T_NUMBER;
    case JKind::Num: return T_NUMBER;
    case JKind::Str: return T_STRING;
    case JKind::Arr: return T_ARRAY;
    case JKind::Obj: return T_OBJECT;
  }
  return 0;
}

}  // namespace

const char* err_kind_name(ErrKind k) {
  switch (k) {
    case ErrKind::UnterminatedTag: return "unterminated_tag";
    case ErrKind::InvalidJson: return "invalid_json";
    case ErrKind::TooDeep: return "too_deep";
    case ErrKind::TooLarge: return "too_large";
    case ErrKind::InvalidCall: return "invalid_call";
    case ErrKind::UnknownTool: return "unknown_tool";
    case ErrKind::MissingArgument: return "missing_argument";
    case ErrKind::InvalidArgument: return "invalid_argument";
  }
  return "?";
}

void Scanner::reset() {
  think_.clear();
  outside_.clear();
  has_think_ = false;
  st_ = St::Outside;
  p_ = tag_start_ = body_ = 0;
  block_tag_ = 0;
  seen_block_ = in_str_ = false;
  calls_seen_ = cur_index_ = 0;
}

void Scanner::run(const char* buf, size_t n, bool final, ParseOut& out) {
  bool wait = false;
  while (!wait) {
    if (st_ == St::Outside) {
      if (p_ >= n) break;
      outside(buf, n, final, out, wait);
    } else if (st_ == St::Call) {
      call(buf, n, final, out, wait);
    } else {
      block(buf, n, final, out, wait);
    }
  }
  if (final) finalize(out);
}

void Scanner::finalize(ParseOut& out) {
  out.has_think = has_think_;
  out.think = out.put(think_);
  out.outside = out.put(outside_);
}

void Scanner::push_error(ParseOut& out, ErrKind kind, const std::string& msg, size_t pos,
                         size_t start, size_t end, int64_t index) {
  out.errors.push_back(ErrRec{index, kind, out.put(msg), pos, start, end});
}

void Scanner::outside(const char* buf, size_t n, bool final, ParseOut& /*out*/, bool& wait) {
  while (p_ < n) {
    const void* lt = std::memchr(buf + p_, '<', n - p_);
    size_t q = lt ? static_cast<size_t>(static_cast<const char*>(lt) - buf) : n;
    outside_.append(buf + p_, q - p_);
    p_ = q;
    if (q >= n) return;
    bool partial = false;
    int m = match(buf, n, q, kCallO);
    if (m == 1) {
      st_ = St::Call;
      tag_start_ = q;
      body_ = p_ = q + len(kCallO);
      in_str_ = false;
      seen_block_ = true;
      cur_index_ = calls_seen_++;
      return;
    }
    partial |= m < 0;
    m = match(buf, n, q, kThinkO);
    if (m == 1) {
      st_ = St::Think;
      tag_start_ = q;
      body_ = p_ = q + len(kThinkO);
      seen_block_ = true;
      return;
    }
    partial |= m < 0;
    int tag = 0;
    m = match(buf, n, q, kAnsO);
    partial |= m < 0;
    if (m == 1) tag = 1;
    m = match(buf, n, q, kRespO);
    partial |= m < 0;
    if (m == 1) tag = 2;
    if (tag) {
      st_ = St::Answer;
      block_tag_ = tag;
      tag_start_ = q;
      body_ = p_ = q + (tag == 1 ? len(kAnsO) : len(kRespO));
      seen_block_ = true;
      return;
    }
    if (!seen_block_) {
      // "...</think>" with no opening tag (the chat template put <think> in the prompt)
      m = match(buf, n, q, kThinkC);
      if (m == 1) {
        think_.swap(outside_);
        outside_.clear();
        has_think_ = true;
        seen_block_ = true;
        p_ = q + len(kThinkC);
        continue;
      }
      partial |= m < 0;
    }
    if (partial && !final) {
      wait = true;
      return;
    }
    outside_.push_back('<');
    p_ = q + 1;
  }
}

void Scanner::block(const char* buf, size_t n, bool final, ParseOut& out, bool& wait) {
  const bool think = st_ == St::Think;
  const char* tag = think ? kThinkC : block_tag_ == 1 ? kAnsC : kRespC;
  const size_t tl = think ? len(kThinkC) : block_tag_ == 1 ? len(kAnsC) : len(kRespC);
  size_t close = n;
  while (p_ < n) {
    const void* lt = std::memchr(buf + p_, '<', n - p_);
    if (!lt) {
      p_ = n;
      break;
    }
    size_t q = static_cast<const char*>(lt) - buf;
    size_t avail = n - q;
    if (avail >= tl && std::memcmp(buf + q, tag, tl) == 0) {
      close = q;
      break;
    }
    if (avail < tl && std::memcmp(buf + q, tag, avail) == 0 && !final) {
      p_ = q;
      wait = true;
      return;
    }
    p_ = q + 1;
  }
  if (close == n && !final) {
    wait = true;
    return;
  }
  if (think) {
    if (has_think_) think_.push_back('\n');
    think_.append(buf + body_, close - body_);
    has_think_ = true;
  } else if (out.answer_tag == 0) {
    out.answer = out.put(buf + body_, close - body_);
    out.answer_tag = block_tag_;
  }
  st_ = St::Outside;
  if (close < n) {
    p_ = close + tl;
    return;
  }
  p_ = n;
  std::string msg = "unterminated ";
  msg += think ? "<think>" : block_tag_ == 1 ? "<answer>" : "<response>";
  push_error(out, ErrKind::UnterminatedTag, msg, tag_start_, tag_start_, n, -1);
}

// One-shot fast path: parse the JSON straight from the body start; if a value followed by
// whitespace and </tool_call> is found, that closing tag is exactly the one the lexer would find
// (valid JSON has no '<' outside strings and the lexer tracks its strings exactly), so the
// result is identical and the lexer pass is skipped. Anything else falls back to the lexer.
bool Scanner::fast_call(const char* buf, size_t n, ParseOut& out) {
  constexpr size_t kFastLimit = 1 << 16;  // bounds the work wasted on a failed attempt
  size_t lim = body_ + std::min(tools_->max_call_bytes, kFastLimit);
  if (lim > n) lim = n;
  uint32_t root;
  size_t q;
  if (!doc_.parse_prefix(buf, body_, lim, tools_->max_depth, jerr_, root, q)) return false;
  while (q < n && (buf[q] == ' ' || buf[q] == '\n' || buf[q] == '\r' || buf[q] == '\t')) ++q;
  if (q - body_ > tools_->max_call_bytes || n - q < len(kCallC) ||
      std::memcmp(buf + q, kCallC, len(kCallC)) != 0)
    return false;
  complete_call(root, q + len(kCallC), out);
  p_ = q + len(kCallC);
  st_ = St::Outside;
  return true;
}

void Scanner::call(const char* buf, size_t n, bool final, ParseOut& out, bool& wait) {
  if (final && p_ == body_ && fast_call(buf, n, out)) return;
  const uint8_t* s = reinterpret_cast<const uint8_t*>(buf);
  size_t p = p_;
  while (p < n) {
    if (!in_str_) {
      while (p < n && !(kLex.t[s[p]] & 1)) ++p;
      if (p >= n) break;
      if (s[p] == '"') {
        in_str_ = true;
        ++p;
        continue;
      }
      int m = match(buf, n, p, kCallC);
      if (m == 1) {
        finish_call(buf, p, p + len(kCallC), out);
        p_ = p + len(kCallC);
        st_ = St::Outside;
        return;
      }
      if (m < 0 && !final) {
        p_ = p;
        wait = true;
        return;
      }
      ++p;
    } else {
      while (p < n && !(kLex.t[s[p]] & 2)) ++p;
      if (p >= n) break;
      if (s[p] == '"') {
        in_str_ = false;
        ++p;
        continue;
      }
      if (p + 1 >= n) {
        if (!final) {
          p_ = p;
          wait = true;
          return;
        }
        p = n;
        break;
      }
      p += 2;
    }
  }
  p_ = n;
  if (!final) {
    wait = true;
    return;
  }
  st_ = St::Outside;
  // No closing tag outside a JSON string (unbalanced quotes): end at the first literal one.
  const void* f = memmem(buf + body_, n - body_, kCallC, len(kCallC));
  if (f) {
    size_t q = static_cast<const char*>(f) - buf;
    finish_call(buf, q, q + len(kCallC), out);
    p_ = q + len(kCallC);
    return;
  }
  push_error(out, ErrKind::UnterminatedTag, "unterminated <tool_call>", tag_start_, tag_start_, n,
             cur_index_);
}

void Scanner::finish_call(const char* buf, size_t body_end, size_t span_end, ParseOut& out) {
  char tmp[160];
  size_t size = body_end - body_;
  if (size > tools_->max_call_bytes) {
    std::snprintf(tmp, sizeof tmp, "tool call body is %zu bytes, more than max_call_bytes=%zu",
                  size, tools_->max_call_bytes);
    push_error(out, ErrKind::TooLarge, tmp, body_ + tools_->max_call_bytes, tag_start_, span_end,
               cur_index_);
    return;
  }
  uint32_t root;
  if (!doc_.parse(buf, body_, body_end, tools_->max_depth, jerr_, root)) {
    push_error(out, jerr_.too_deep ? ErrKind::TooDeep : ErrKind::InvalidJson, jerr_.message,
               jerr_.pos, tag_start_, span_end, cur_index_);
    return;
  }
  complete_call(root, span_end, out);
}

void Scanner::complete_call(uint32_t root, size_t span_end, ParseOut& out) {
  ErrKind kind = ErrKind::InvalidCall;
  std::string& msg = msg_;
  msg.clear();
  size_t pos = 0;
  char tmp[160];
  const JNode r = doc_.nodes[root];
  int64_t nm = -1, ar = -1;
  if (r.kind != JKind::Obj) {
    std::snprintf(tmp, sizeof tmp, "tool call must be a JSON object, got %s", jkind_name(r.kind));
    msg = tmp;
    pos = r.pos;
  } else if ((nm = doc_.member(root, "name", 4)) < 0) {
    msg = "tool call has no \"name\"";
    pos = r.pos;
  } else if (doc_.nodes[nm].kind != JKind::Str) {
    std::snprintf(tmp, sizeof tmp, "\"name\" must be a string, got %s",
                  jkind_name(doc_.nodes[nm].kind));
    msg = tmp;
    pos = doc_.nodes[nm].pos;
  } else if ((ar = doc_.member(root, "arguments", 9)) >= 0 &&
             doc_.nodes[ar].kind != JKind::Obj) {
    std::snprintf(tmp, sizeof tmp, "\"arguments\" must be an object, got %s",
                  jkind_name(doc_.nodes[ar].kind));
    msg = tmp;
    pos = doc_.nodes[ar].pos;
  }
  if (!msg.empty()) {
    push_error(out, kind, msg, pos, tag_start_, span_end, cur_index_);
    return;
  }
  const JNode nn = doc_.nodes[nm];
  std::string_view name(doc_.str_data(static_cast<uint32_t>(nm)), nn.n);
  auto it = tools_->index.find(name);
  if (it == tools_->index.end()) {
    msg = "unknown tool ";
    append_json_string(name.data(), name.size(), msg);
    push_error(out, ErrKind::UnknownTool, msg, nn.pos, tag_start_, span_end, cur_index_);
    return;
  }
  uint32_t args = ar >= 0 ? static_cast<uint32_t>(ar) : doc_.add_empty_object(r.pos);
  path_.clear();
  if (!validate(args, tools_->schemas[it->second], msg, kind, pos)) {
    push_error(out, kind, msg, pos, tag_start_, span_end, cur_index_);
    return;
  }
  if (out.calls.capacity() == 0) out.calls.reserve(4);
  Slice sn = out.put(name.data(), name.size());
  Slice sa{static_cast<uint32_t>(out.store.size()), 0};
  doc_.canonical(args, out.store);
  sa.len = static_cast<uint32_t>(out.store.size() - sa.off);
  out.calls.push_back(CallRec{cur_index_, sn, sa, tag_start_, span_end});
}

bool Scanner::validate(uint32_t node, const Schema& sc, std::string& msg, ErrKind& kind,
                       size_t& pos) {
  const JNode nd = doc_.nodes[node];
  kind = ErrKind::InvalidArgument;
  pos = nd.pos;
  if (sc.types && !(sc.types & kind_bits(nd.kind))) {
    msg = "argument " + path_string(path_) + ": expected ";
    for (size_t i = 0; i < sc.type_names.size(); ++i) {
      if (i) msg += " or ";
      msg += sc.type_names[i];
    }
    msg += ", got ";
    msg += jkind_name(nd.kind);
    return false;
  }
  if (sc.has_enum) {
    canon_.clear();
    doc_.canonical(node, canon_);
    bool found = false;
    for (const std::string& v : sc.enum_canon) found = found || v == canon_;
    if (!found) {
      msg = "argument " + path_string(path_) + ": not one of the enum values";
      return false;
    }
  }
  if (nd.kind == JKind::Obj) {
    for (const std::string& r : sc.required) {
      if (doc_.member(node, r.data(), r.size()) >= 0) continue;
      std::string key;
      append_json_string(r.data(), r.size(), key);
      path_.push_back(std::move(key));
      kind = ErrKind::MissingArgument;
      msg = "missing required argument " + path_string(path_);
      return false;
    }
    for (uint32_t i = 0; i < nd.n; ++i) {
      const JNode& k = doc_.nodes[doc_.kids[nd.a + 2 * i]];
      uint32_t val = doc_.kids[nd.a + 2 * i + 1];
      std::string_view key(doc_.data(k), k.n);
      auto it = sc.props.find(key);
      if (it == sc.props.end() && sc.additional) continue;
      std::string elem;
      append_json_string(key.data(), key.size(), elem);
      path_.push_back(std::move(elem));
      if (it == sc.props.end()) {
        msg = "argument " + path_string(path_) + ": unexpected argument";
        pos = doc_.nodes[val].pos;
        return false;
      }
      if (!validate(val, it->second, msg, kind, pos)) return false;
      path_.pop_back();
    }
  } else if (nd.kind == JKind::Arr && sc.items) {
    for (uint32_t i = 0; i < nd.n; ++i) {
      path_.push_back(std::to_string(i));
      if (!validate(doc_.kids[nd.a + i], *sc.items, msg, kind, pos)) return false;
      path_.pop_back();
    }
  }
  return true;
}

void parse_text(Scanner& scanner, const char* text, size_t n, ParseOut& out) {
  scanner.reset();
  out.store.reserve(n + 16);
  scanner.run(text, n, true, out);
}

}  // namespace spyglass
