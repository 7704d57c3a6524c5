// Tool-call scanner and validator (see toolcall.h; the format is specified in
// engine/toolcall.py). One forward pass: memchr for '<' outside calls, and inside a call one
// JSON parse from the body start that also finds its closing tag (see Scanner::call).
#include "toolcall.h"

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace spyglass {
namespace {

using namespace tags;  // NOLINT: the tag constants and match()

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
  p_ = tag_start_ = body_ = find_ = 0;
  c1_ = xl_ = parsed_xl_ = pend_to_ = kNone;
  pend_len_ = 0;
  pend_parses_ = 0;
  block_tag_ = 0;
  seen_block_ = in_str_ = false;
  calls_seen_ = cur_index_ = 0;
  outside_blank_ = true;
  lead_args_ = val_args_ = in_id_ = semi_ = false;
  val_start_ = depth_ = name_start_ = name_end_ = q_ = 0;
}

void Scanner::run(const char* buf, size_t n, bool final, ParseOut& out) {
  bool wait = false;
  const bool hermes = tools_->mode == Mode::Hermes;
  while (!wait) {
    switch (st_) {
      case St::Outside:
        if (p_ >= n) {
          wait = true;
          break;
        }
        if (hermes)
          outside(buf, n, final, out, wait);
        else
          outside_alt(buf, n, final, wait);
        break;
      case St::Call: call(buf, n, final, out, wait); break;
      case St::Think:
      case St::Answer: block(buf, n, final, out, wait); break;
      case St::Lead: lead(buf, n, final, wait); break;
      case St::Name: name(buf, n, final, out, wait); break;
      case St::Value: value(buf, n, final, out, wait); break;
      case St::Sep: sep(buf, n, final, wait); break;
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
    int t = tag_at(buf, n, q, final);
    if (t < 0) {
      wait = true;
      return;
    }
    if (t > 0) {
      if (st_ != St::Outside) return;
      continue;
    }
    outside_.push_back('<');
    p_ = q + 1;
  }
}

void Scanner::open_block(size_t q) {
  tag_start_ = q;
  seen_block_ = true;
  cur_index_ = calls_seen_++;
}

// A tag at buf[q] == '<' outside blocks: 1 if one was taken (state and p_ updated), 0 if the
// '<' is plain text, -1 if the buffer ends inside a possible tag (not final).
int Scanner::tag_at(const char* buf, size_t n, size_t q, bool final) {
  bool partial = false;
  int m = 0;
  if (tools_->mode == Mode::Hermes) {
    m = match(buf, n, q, kCallO);
    if (m == 1) {
      open_block(q);
      st_ = St::Call;
      body_ = p_ = find_ = q + len(kCallO);
      c1_ = xl_ = parsed_xl_ = pend_to_ = kNone;
      pend_len_ = 0;
      pend_parses_ = 0;
      return 1;
    }
  } else if (tools_->mode == Mode::Llama3Json) {
    m = match(buf, n, q, kPyTag);
    if (m == 1) {
      open_block(q);
      st_ = St::Lead;
      lead_args_ = false;
      p_ = q + len(kPyTag);
      return 1;
    }
  }
  partial |= m < 0;
  m = match(buf, n, q, kThinkO);
  if (m == 1) {
    st_ = St::Think;
    tag_start_ = q;
    body_ = p_ = q + len(kThinkO);
    seen_block_ = true;
    return 1;
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
    return 1;
  }
  if (!seen_block_) {
    // "...</think>" with no opening tag (the chat template put <think> in the prompt)
    m = match(buf, n, q, kThinkC);
    if (m == 1) {
      think_.swap(outside_);
      outside_.clear();
      outside_blank_ = true;
      has_think_ = true;
      seen_block_ = true;
      p_ = q + len(kThinkC);
      return 1;
    }
    partial |= m < 0;
  }
  return partial && !final ? -1 : 0;
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

// A Hermes call body: the bytes up to the </tool_call> that follows a complete JSON value and
// whitespace, if the body before it is valid JSON within max_depth and max_call_bytes (that tag
// is the first one outside a JSON string); otherwise up to the first literal </tool_call>. The
// parse runs from the body start to min(body + max_call_bytes, E), E = the end of the text
// (final) or, streaming, the last literal </tool_call> so far: a `<` there can only continue a
// string, so the outcome is final unless the parse ended inside a string before the size limit.
// Cost: parses that outlive the next block's start are inside a string there, so the two are
// complementary and the next literal </tool_call> ends one of them: at most two parses cover
// any byte, and the text is scanned O(1) times overall. Streaming, a call pending inside a
// string is parsed again at a new closing tag only when the bytes since could decide it (not
// all plain string bytes) and, after kFreeParses parses, only once its body has grown by a
// quarter since the last one (else at a later tag or at the end), so the parses of one call
// cost O(its bytes) however many closing tags its strings hold.
static constexpr int kFreeParses = 8;

void Scanner::call(const char* buf, size_t n, bool final, ParseOut& out, bool& wait) {
  const size_t cl = len(kCallC);
  if (!final) {  // streaming: the first (c1_) and last (xl_) literal closing tag so far
    size_t from = find_;
    while (from < n) {
      const void* f = memmem(buf + from, n - from, kCallC, cl);
      if (!f) break;
      size_t q = static_cast<size_t>(static_cast<const char*>(f) - buf);
      if (c1_ == kNone) c1_ = q;
      xl_ = q;
      from = q + cl;  // "</tool_call>" cannot overlap itself
    }
    find_ = std::max(from, n >= cl ? n - cl + 1 : size_t{0});
    if (c1_ == kNone || xl_ == parsed_xl_) {
      wait = true;
      return;
    }
    if (pend_to_ != kNone && xl_ < body_ + tools_->max_call_bytes) {
      pend_to_ = json_plain_run(buf, pend_to_, xl_);
      if (pend_to_ == xl_) {  // still in the same string: the parse would end there again
        parsed_xl_ = xl_;
        wait = true;
        return;
      }
      if (pend_parses_ >= kFreeParses && xl_ - body_ < pend_len_ + std::max<size_t>(16, pend_len_ / 4)) {
        wait = true;  // amortised: the next closing tag (or the end) looks again
        return;
      }
    }
    parsed_xl_ = xl_;
  }
  const size_t lim = body_ + tools_->max_call_bytes;
  const size_t e = std::min(lim, final ? n : xl_);
  uint32_t root;
  size_t q;
  if (doc_.parse_prefix(buf, body_, e, tools_->max_depth, jerr_, root, q)) {
    while (q < e && is_ws(buf[q])) ++q;
    if (n - q >= cl && std::memcmp(buf + q, kCallC, cl) == 0) {
      emit_block(root, q + cl, out);
      p_ = q + cl;
      st_ = St::Outside;
      return;
    }
  } else if (!final && jerr_.in_string_end && e < lim) {
    pend_to_ = e;  // inside a string at the last closing tag: later bytes decide
    pend_len_ = e - body_;
    ++pend_parses_;
    wait = true;
    return;
  }
  // Not a valid body up to a closing tag: recover at the first literal one.
  if (final && c1_ == kNone) {
    const void* f = memmem(buf + body_, n - body_, kCallC, cl);
    if (f) c1_ = static_cast<size_t>(static_cast<const char*>(f) - buf);
  }
  st_ = St::Outside;
  if (c1_ == kNone) {
    p_ = n;
    push_error(out, ErrKind::UnterminatedTag, "unterminated <tool_call>", tag_start_, tag_start_,
               n, cur_index_);
    return;
  }
  finish_call(buf, c1_, c1_ + cl, out);
  p_ = c1_ + cl;
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
  emit_block(root, span_end, out);
}

// The call(s) of one parsed block: an object is one call, an array one call per element (each
// with the next index; all share the block's span).
void Scanner::emit_block(uint32_t root, size_t span_end, ParseOut& out) {
  const JNode r = doc_.nodes[root];
  if (r.kind != JKind::Arr) {
    one_call(root, 1, span_end, out);
    return;
  }
  if (r.n == 0) {
    push_error(out, ErrKind::InvalidCall, "tool call list is empty", r.pos, tag_start_, span_end,
               cur_index_);
    return;
  }
  for (uint32_t i = 0; i < r.n; ++i) {
    if (i) cur_index_ = calls_seen_++;
    one_call(doc_.kids[r.a + i], 2, span_end, out);
  }
}

// One call object (at nesting `depth`) of doc_: {"name": str, "arguments" | "parameters": ...}.
void Scanner::one_call(uint32_t node, int depth, size_t span_end, ParseOut& out) {
  char tmp[160];
  const JNode r = doc_.nodes[node];
  const char* msg = nullptr;
  size_t pos = r.pos;
  int64_t nm = -1, ar = -1, pa = -1;
  for (uint32_t i = 0; r.kind == JKind::Obj && i < r.n; ++i) {  // one pass over the keys
    const JNode& k = doc_.nodes[doc_.kids[r.a + 2 * i]];
    const int64_t v = doc_.kids[r.a + 2 * i + 1];
    const char* kd = doc_.data(k);
    if (k.n == 4 && std::memcmp(kd, "name", 4) == 0) nm = v;
    if (k.n == 9 && std::memcmp(kd, "arguments", 9) == 0) ar = v;
    if (k.n == 10 && std::memcmp(kd, "parameters", 10) == 0) pa = v;
  }
  if (r.kind != JKind::Obj) {
    std::snprintf(tmp, sizeof tmp, "tool call must be a JSON object, got %s", jkind_name(r.kind));
    msg = tmp;
  } else if (nm < 0) {
    msg = "tool call has no \"name\"";
  } else if (doc_.nodes[nm].kind != JKind::Str) {
    std::snprintf(tmp, sizeof tmp, "\"name\" must be a string, got %s",
                  jkind_name(doc_.nodes[nm].kind));
    msg = tmp;
    pos = doc_.nodes[nm].pos;
  } else if (ar >= 0 && pa >= 0) {
    msg = "tool call has both \"arguments\" and \"parameters\"";
    pos = doc_.nodes[pa].pos;
  }
  if (msg) {
    push_error(out, ErrKind::InvalidCall, msg, pos, tag_start_, span_end, cur_index_);
    return;
  }
  const char* key = ar < 0 && pa >= 0 ? "parameters" : "arguments";
  if (ar < 0) ar = pa;
  const JNode nn = doc_.nodes[nm];
  std::string_view name(doc_.str_data(static_cast<uint32_t>(nm)), nn.n);
  finish_args(name, nn.pos, ar, r.pos, key, depth, span_end, out);
}

// Checks a call's arguments value `ar` (a doc_ node, -1 if absent: {} at empty_pos): an object,
// or a JSON string holding one (parsed into sdoc_; its errors are reported at the string's
// quote). Then the tool name and the schema; emits the call or its first error.
void Scanner::finish_args(std::string_view name, size_t name_pos, int64_t ar, uint32_t empty_pos,
                          const char* key, int depth, size_t span_end, ParseOut& out) {
  char tmp[200];
  std::string& msg = msg_;
  const JDoc* d = &doc_;
  uint32_t args = 0;
  int64_t at = -1;  // the string's quote when the arguments were a JSON string
  JKind k = ar >= 0 ? doc_.nodes[ar].kind : JKind::Obj;
  if (ar < 0) {
    args = doc_.add_empty_object(empty_pos);
  } else if (k == JKind::Obj) {
    args = static_cast<uint32_t>(ar);
  } else if (k == JKind::Str) {
    const JNode sn = doc_.nodes[ar];
    at = sn.pos;
    sbuf_.assign(doc_.data(sn), sn.n);
    if (!sdoc_.parse(sbuf_.data(), 0, sbuf_.size(), tools_->max_depth, jerr_, args, depth)) {
      std::snprintf(tmp, sizeof tmp, "in the \"%s\" string at byte %zu: ", key, jerr_.pos);
      msg = tmp + jerr_.message;
      push_error(out, jerr_.too_deep ? ErrKind::TooDeep : ErrKind::InvalidJson, msg,
                 static_cast<size_t>(at), tag_start_, span_end, cur_index_);
      return;
    }
    d = &sdoc_;
    k = sdoc_.nodes[args].kind;
  }
  if (k != JKind::Obj) {
    std::snprintf(tmp, sizeof tmp, at >= 0 ? "\"%s\" string must hold a JSON object, got %s"
                                           : "\"%s\" must be an object, got %s",
                  key, jkind_name(k));
    push_error(out, ErrKind::InvalidCall, tmp, at >= 0 ? at : doc_.nodes[ar].pos, tag_start_,
               span_end, cur_index_);
    return;
  }
  auto it = tools_->index.find(name);
  if (it == tools_->index.end()) {
    msg = "unknown tool ";
    append_json_string(name.data(), name.size(), msg);
    push_error(out, ErrKind::UnknownTool, msg, name_pos, tag_start_, span_end, cur_index_);
    return;
  }
  path_.clear();
  ErrKind kind;
  size_t pos;
  if (!validate(*d, args, tools_->schemas[it->second], msg, kind, pos)) {
    push_error(out, kind, msg, at >= 0 ? static_cast<size_t>(at) : pos, tag_start_, span_end,
               cur_index_);
    return;
  }
  if (out.calls.capacity() == 0) out.calls.reserve(4);
  Slice sn = out.put(name.data(), name.size());
  Slice sa{static_cast<uint32_t>(out.store.size()), 0};
  d->canonical(args, out.store);
  sa.len = static_cast<uint32_t>(out.store.size() - sa.off);
  out.calls.push_back(CallRec{cur_index_, sn, sa, tag_start_, span_end});
}

bool Scanner::validate(const JDoc& d, uint32_t node, const Schema& sc, std::string& msg,
                       ErrKind& kind, size_t& pos) {
  const JNode nd = d.nodes[node];
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
    d.canonical(node, canon_);
    bool found = false;
    for (const std::string& v : sc.enum_canon) found = found || v == canon_;
    if (!found) {
      msg = "argument " + path_string(path_) + ": not one of the enum values";
      return false;
    }
  }
  if (nd.kind == JKind::Obj) {
    for (const std::string& r : sc.required) {
      if (d.member(node, r.data(), r.size()) >= 0) continue;
      std::string key;
      append_json_string(r.data(), r.size(), key);
      path_.push_back(std::move(key));
      kind = ErrKind::MissingArgument;
      msg = "missing required argument " + path_string(path_);
      return false;
    }
    for (uint32_t i = 0; i < nd.n; ++i) {
      const JNode& k = d.nodes[d.kids[nd.a + 2 * i]];
      uint32_t val = d.kids[nd.a + 2 * i + 1];
      std::string_view key(d.data(k), k.n);
      auto it = sc.props.find(key);
      if (it == sc.props.end() && sc.additional) continue;
      std::string elem;
      append_json_string(key.data(), key.size(), elem);
      path_.push_back(std::move(elem));
      if (it == sc.props.end()) {
        msg = "argument " + path_string(path_) + ": unexpected argument";
        pos = d.nodes[val].pos;
        return false;
      }
      if (!validate(d, val, it->second, msg, kind, pos)) return false;
      path_.pop_back();
    }
  } else if (nd.kind == JKind::Arr && sc.items) {
    for (uint32_t i = 0; i < nd.n; ++i) {
      path_.push_back(std::to_string(i));
      if (!validate(d, d.kids[nd.a + i], *sc.items, msg, kind, pos)) return false;
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
