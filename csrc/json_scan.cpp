// JSON scanner and canonical writer (see json_scan.h). Error positions are the first byte at
// which the input stops being a prefix of valid JSON, except: invalid UTF-8 is reported at the
// first byte of the ill-formed sequence, a bad \u escape at its backslash, and an out-of-range
// exponent at the number's first byte.
#include "json_scan.h"

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace spyglass {
namespace {

inline bool is_digit(uint8_t c) { return c >= '0' && c <= '9'; }

// Largest |decimal exponent| of a nonzero number (engine/toolcall.py: 10**18 - 1).
constexpr int64_t kMaxExp10 = 999999999999999999LL;

// Byte classes: bit 1 = ends a plain run inside a string being parsed ('"', '\\', < 0x20,
// >= 0x80); bit 2 = must be escaped when writing a string ('"', '\\', < 0x20).
struct ByteClass {
  uint8_t t[256];
  constexpr ByteClass() : t() {
    for (int c = 0; c < 256; ++c)
      t[c] = static_cast<uint8_t>((c == '"' || c == '\\' || c < 0x20 || c >= 0x80 ? 1 : 0) |
                                  (c == '"' || c == '\\' || c < 0x20 ? 2 : 0));
  }
};
constexpr ByteClass kClass{};

// End of the run of bytes at s[p..end) that need no attention inside a string (not '"', '\\',
// < 0x20 or >= 0x80): 8 bytes at a time, then byte by byte from the first flagged word.
inline size_t plain_run(const uint8_t* s, size_t p, size_t end) {
  constexpr uint64_t kOnes = 0x0101010101010101ULL, kHigh = 0x8080808080808080ULL;
  while (p + 8 <= end) {
    uint64_t v;
    std::memcpy(&v, s + p, 8);
    uint64_t q = v ^ (kOnes * '"'), b = v ^ (kOnes * '\\');
    uint64_t flags = ((v - kOnes * 0x20) | (q - kOnes) | (b - kOnes) | v) & kHigh;
    if (flags) break;  // may be a false alarm: the byte loop below decides
    p += 8;
  }
  while (p < end && !(kClass.t[s[p]] & 1)) ++p;
  return p;
}

inline int hex_val(uint8_t c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Length of the well-formed UTF-8 sequence at s[p] (lead byte >= 0x80), or 0 if ill-formed
// (Unicode Table 3-7; truncation at `end` is ill-formed).
inline size_t utf8_len(const uint8_t* s, size_t p, size_t end) {
  uint8_t c = s[p];
  size_t len;
  uint8_t lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    len = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    len = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (p + len > end) {
    // still ill-formed, but check that what is there is a valid prefix is irrelevant: error
    return 0;
  }
  if (s[p + 1] < lo || s[p + 1] > hi) return 0;
  for (size_t i = 2; i < len; ++i)
    if (s[p + i] < 0x80 || s[p + i] > 0xBF) return 0;
  return len;
}

inline void put_utf8(uint32_t cp, std::string& out) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace

struct JParser {
  const uint8_t* s;
  size_t end;
  int max_depth;
  JDoc& d;
  JError& err;

  bool fail(const char* msg, size_t pos) {
    err.too_deep = false;
    err.in_string_end = false;
    err.message = msg;
    err.pos = pos;
    return false;
  }
  bool unexpected(size_t pos) {
    if (pos >= end) return fail("unexpected end of input", end);
    char buf[48];
    uint8_t c = s[pos];
    if (c >= 0x21 && c <= 0x7E)
      std::snprintf(buf, sizeof buf, "unexpected character '%c'", c);
    else
      std::snprintf(buf, sizeof buf, "unexpected byte 0x%02x", c);
    return fail(buf, pos);
  }
  size_t ws(size_t p) const {
    while (p < end && (s[p] == ' ' || s[p] == '\n' || s[p] == '\r' || s[p] == '\t')) ++p;
    return p;
  }
  uint32_t push(JKind k, size_t pos, size_t a, size_t n, bool raw = false) {
    d.nodes.push_back(JNode{k, raw, static_cast<uint32_t>(pos), static_cast<uint32_t>(a),
                            static_cast<uint32_t>(n)});
    return static_cast<uint32_t>(d.nodes.size() - 1);
  }

  bool literal(size_t& p, const char* lit, size_t n) {
    for (size_t i = 0; i < n; ++i)
      if (p + i >= end || s[p + i] != static_cast<uint8_t>(lit[i])) return unexpected(p + i);
    p += n;
    return true;
  }

  // Reads 4 hex digits of the \u escape whose backslash is at `bs`.
  bool hex4(size_t bs, uint32_t& v) {
    v = 0;
    for (size_t i = 0; i < 4; ++i) {
      size_t q = bs + 2 + i;
      if (q >= end) return fail("unexpected end of input", end);
      int h = hex_val(s[q]);
      if (h < 0) return fail("invalid \\u escape", bs);
      v = v * 16 + static_cast<uint32_t>(h);
    }
    return true;
  }

  bool escape(size_t& p, std::string& out) {  // s[p] == '\\'
    size_t bs = p;
    if (p + 1 >= end) return fail("unexpected end of input", end);
    uint8_t c = s[p + 1];
    char simple = 0;
    switch (c) {
      case '"': simple = '"'; break;
      case '\\': simple = '\\'; break;
      case '/': simple = '/'; break;
      case 'b': simple = '\b'; break;
      case 'f': simple = '\f'; break;
      case 'n': simple = '\n'; break;
      case 'r': simple = '\r'; break;
      case 't': simple = '\t'; break;
      case 'u': break;
      default: return fail("invalid escape", bs);
    }
    if (simple) {
      out.push_back(simple);
      p += 2;
      return true;
    }
    uint32_t cp;
    if (!hex4(bs, cp)) return false;
    p = bs + 6;
    if (cp >= 0xDC00 && cp <= 0xDFFF) return fail("lone surrogate in \\u escape", bs);
    if (cp >= 0xD800 && cp <= 0xDBFF) {
      if (p + 1 >= end || s[p] != '\\' || s[p + 1] != 'u')
        return fail("lone surrogate in \\u escape", bs);
      uint32_t lo;
      if (!hex4(p, lo)) return false;
      if (lo < 0xDC00 || lo > 0xDFFF) return fail("lone surrogate in \\u escape", bs);
      cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
      p += 6;
    }
    put_utf8(cp, out);
    return true;
  }

  bool string(size_t& p, uint32_t& out) {  // s[p] == '"'
    size_t start = p++;
    size_t q0 = plain_run(s, p, end);
    if (q0 < end && s[q0] == '"') {  // fast path: plain ASCII, no escapes: point at the source
      out = push(JKind::Str, start, p, q0 - p, true);
      p = q0 + 1;
      return true;
    }
    std::string& b = d.bytes;
    size_t off = b.size();
    for (;;) {
      size_t q = p;
      q = plain_run(s, q, end);
      b.append(reinterpret_cast<const char*>(s + p), q - p);
      p = q;
      if (p >= end) {
        fail("unexpected end of input", end);
        err.in_string_end = true;
        return false;
      }
      uint8_t c = s[p];
      if (c == '"') {
        ++p;
        break;
      }
      if (c == '\\') {
        if (!escape(p, b)) return false;
      } else if (c < 0x20) {
        return fail("control character in string", p);
      } else {
        size_t len = utf8_len(s, p, end);
        if (!len) return fail("invalid UTF-8", p);
        b.append(reinterpret_cast<const char*>(s + p), len);
        p += len;
      }
    }
    out = push(JKind::Str, start, off, b.size() - off);
    return true;
  }

  bool number(size_t& p, uint32_t& out) {
    size_t start = p;
    bool neg = false;
    if (s[p] == '-') {
      neg = true;
      ++p;
    }
    if (p >= end) return unexpected(p);
    size_t i0 = p;
    if (s[p] == '0') {
      ++p;
    } else if (s[p] >= '1' && s[p] <= '9') {
      while (p < end && is_digit(s[p])) ++p;
    } else {
      return unexpected(p);
    }
    size_t i1 = p, f0 = p, f1 = p;
    if (p < end && s[p] == '.') {
      ++p;
      if (p >= end || !is_digit(s[p])) return unexpected(p);
      f0 = p;
      while (p < end && is_digit(s[p])) ++p;
      f1 = p;
    }
    int64_t exp = 0;
    bool huge_exp = false;  // more than 18 significant exponent digits
    if (p < end && (s[p] == 'e' || s[p] == 'E')) {
      ++p;
      bool eneg = false;
      if (p < end && (s[p] == '+' || s[p] == '-')) eneg = s[p++] == '-';
      if (p >= end || !is_digit(s[p])) return unexpected(p);
      size_t e0 = p;
      while (p < end && is_digit(s[p])) ++p;
      while (e0 < p && s[e0] == '0') ++e0;
      huge_exp = p - e0 > 18;
      for (size_t k = e0; k < p && !huge_exp; ++k) exp = exp * 10 + (s[k] - '0');
      if (eneg) exp = -exp;
    }
    // canonical form: value = D * 10^E with D's leading and trailing zeros stripped
    std::string& dg = d.digits_;
    dg.assign(reinterpret_cast<const char*>(s + i0), i1 - i0);
    dg.append(reinterpret_cast<const char*>(s + f0), f1 - f0);
    size_t lead = 0;
    while (lead < dg.size() && dg[lead] == '0') ++lead;
    std::string& b = d.bytes;
    size_t off = b.size();
    if (lead == dg.size()) {
      b.push_back('0');
      out = push(JKind::Int, start, off, 1);
      return true;
    }
    size_t last = dg.size();
    while (dg[last - 1] == '0') --last;
    const char* D = dg.data() + lead;
    int64_t n = static_cast<int64_t>(last - lead);
    int64_t E = exp - static_cast<int64_t>(f1 - f0) + static_cast<int64_t>(dg.size() - last);
    int64_t k = n + E;
    // The value's decimal exponent (k - 1) must fit 18 digits, so that its canonical text
    // (which may move the exponent by up to the digit count) always parses again. A literal
    // exponent of more than 18 digits cannot be brought back in range: texts are < 4 GiB.
    if (huge_exp || k - 1 > kMaxExp10 || k - 1 < -kMaxExp10) {
      b.resize(off);
      return fail("number exponent out of range", start);
    }
    if (neg) b.push_back('-');
    int64_t int_lim = std::max<int64_t>(21, static_cast<int64_t>(i1 - i0));
    if (E >= 0 && k <= int_lim) {
      b.append(D, static_cast<size_t>(n));
      b.append(static_cast<size_t>(E), '0');
    } else if (E < 0 && k > -6) {
      if (k > 0) {
        b.append(D, static_cast<size_t>(k));
        b.push_back('.');
        b.append(D + k, static_cast<size_t>(n - k));
      } else {
        b.append("0.");
        b.append(static_cast<size_t>(-k), '0');
        b.append(D, static_cast<size_t>(n));
      }
    } else {
      b.push_back(D[0]);
      if (n > 1) {
        b.push_back('.');
        b.append(D + 1, static_cast<size_t>(n - 1));
      }
      char eb[32];
      int m = std::snprintf(eb, sizeof eb, "e%lld", static_cast<long long>(k - 1));
      b.append(eb, static_cast<size_t>(m));
    }
    out = push(E >= 0 ? JKind::Int : JKind::Num, start, off, b.size() - off);
    return true;
  }

  void finish_object(size_t base, size_t start, uint32_t& out) {
    std::vector<uint32_t>& sc = d.scratch_;
    size_t m = (sc.size() - base) / 2;
    std::vector<uint32_t>& ord = d.order_;
    ord.clear();
    for (size_t i = 0; i < m; ++i) ord.push_back(static_cast<uint32_t>(i));
    const JDoc& dd = d;
    auto key_less = [&](uint32_t x, uint32_t y) {
      const JNode& kx = dd.nodes[sc[base + 2 * x]];
      const JNode& ky = dd.nodes[sc[base + 2 * y]];
      int c = std::memcmp(dd.data(kx), dd.data(ky), std::min(kx.n, ky.n));
      return c < 0 || (c == 0 && kx.n < ky.n);
    };
    if (m > 32) {
      std::stable_sort(ord.begin(), ord.end(), key_less);
    } else {  // insertion sort: stable, no allocation
      for (size_t i = 1; i < m; ++i) {
        uint32_t x = ord[i];
        size_t j = i;
        for (; j > 0 && key_less(x, ord[j - 1]); --j) ord[j] = ord[j - 1];
        ord[j] = x;
      }
    }
    size_t a = d.kids.size(), cnt = 0;
    for (size_t i = 0; i < m; ++i) {
      // keep the last of each run of equal keys
      if (i + 1 < m && !key_less(ord[i], ord[i + 1])) continue;
      d.kids.push_back(sc[base + 2 * ord[i]]);
      d.kids.push_back(sc[base + 2 * ord[i] + 1]);
      ++cnt;
    }
    sc.resize(base);
    out = push(JKind::Obj, start, a, cnt);
  }

  bool object(size_t& p, int depth, uint32_t& out) {  // s[p] == '{'
    size_t start = p++;
    size_t base = d.scratch_.size();
    p = ws(p);
    if (p < end && s[p] == '}') {
      ++p;
      finish_object(base, start, out);
      return true;
    }
    for (;;) {
      if (p >= end || s[p] != '"') return unexpected(p);
      uint32_t key, val;
      if (!string(p, key)) return false;
      p = ws(p);
      if (p >= end || s[p] != ':') return unexpected(p);
      if (!value(++p, depth, val)) return false;
      d.scratch_.push_back(key);
      d.scratch_.push_back(val);
      p = ws(p);
      if (p < end && s[p] == ',') {
        p = ws(p + 1);
        continue;
      }
      if (p < end && s[p] == '}') {
        ++p;
        finish_object(base, start, out);
        return true;
      }
      return unexpected(p);
    }
  }

  bool array(size_t& p, int depth, uint32_t& out) {  // s[p] == '['
    size_t start = p++;
    size_t base = d.scratch_.size();
    p = ws(p);
    if (!(p < end && s[p] == ']')) {
      for (;;) {
        uint32_t val;
        if (!value(p, depth, val)) return false;
        d.scratch_.push_back(val);
        p = ws(p);
        if (p < end && s[p] == ',') {
          ++p;
          continue;
        }
        if (p < end && s[p] == ']') break;
        return unexpected(p);
      }
    }
    ++p;
    size_t a = d.kids.size(), n = d.scratch_.size() - base;
    d.kids.insert(d.kids.end(), d.scratch_.begin() + base, d.scratch_.end());
    d.scratch_.resize(base);
    out = push(JKind::Arr, start, a, n);
    return true;
  }

  bool value(size_t& p, int depth, uint32_t& out) {
    p = ws(p);
    if (p >= end) return unexpected(p);
    switch (s[p]) {
      case '{':
      case '[':
        if (depth + 1 > max_depth) {
          char buf[64];
          std::snprintf(buf, sizeof buf, "nesting deeper than max_depth=%d", max_depth);
          fail(buf, p);
          err.too_deep = true;
          return false;
        }
        return s[p] == '{' ? object(p, depth + 1, out) : array(p, depth + 1, out);
      case '"': return string(p, out);
      case 't':
        if (!literal(p, "true", 4)) return false;
        out = push(JKind::True, p - 4, 0, 0);
        return true;
      case 'f':
        if (!literal(p, "false", 5)) return false;
        out = push(JKind::False, p - 5, 0, 0);
        return true;
      case 'n':
        if (!literal(p, "null", 4)) return false;
        out = push(JKind::Null, p - 4, 0, 0);
        return true;
      default:
        if (s[p] == '-' || is_digit(s[p])) return number(p, out);
        return unexpected(p);
    }
  }
};

bool JDoc::parse(const char* text, size_t begin, size_t end, int max_depth, JError& err,
                 uint32_t& root, int depth0) {
  nodes.clear();
  kids.clear();
  bytes.clear();
  scratch_.clear();
  src_ = text;
  JParser ps{reinterpret_cast<const uint8_t*>(text), end, max_depth, *this, err};
  size_t p = begin;
  if (!ps.value(p, depth0, root)) return false;
  p = ps.ws(p);
  if (p < end) return ps.unexpected(p);
  return true;
}

bool JDoc::parse_prefix(const char* text, size_t begin, size_t end, int max_depth, JError& err,
                        uint32_t& root, size_t& value_end, int depth0) {
  nodes.clear();
  kids.clear();
  bytes.clear();
  scratch_.clear();
  src_ = text;
  JParser ps{reinterpret_cast<const uint8_t*>(text), end, max_depth, *this, err};
  value_end = begin;
  return ps.value(value_end, depth0, root);
}

uint32_t JDoc::add_empty_object(uint32_t pos) {
  nodes.push_back(JNode{JKind::Obj, false, pos, static_cast<uint32_t>(kids.size()), 0});
  return static_cast<uint32_t>(nodes.size() - 1);
}

int64_t JDoc::member(uint32_t obj, const char* key, size_t key_len) const {
  const JNode& o = nodes[obj];
  for (uint32_t i = 0; i < o.n; ++i) {
    const JNode& k = nodes[kids[o.a + 2 * i]];
    if (k.n == key_len && std::memcmp(data(k), key, key_len) == 0)
      return kids[o.a + 2 * i + 1];
  }
  return -1;
}

void append_json_string(const char* s, size_t n, std::string& out) {
  static const char hex[] = "0123456789abcdef";
  out.push_back('"');
  size_t p = 0;
  while (p < n) {
    size_t q = p;
    while (q < n && !(kClass.t[static_cast<uint8_t>(s[q])] & 2)) ++q;
    out.append(s + p, q - p);
    if (q >= n) break;
    uint8_t c = static_cast<uint8_t>(s[q]);
    switch (c) {
      case '"': out.append("\\\""); break;
      case '\\': out.append("\\\\"); break;
      case '\b': out.append("\\b"); break;
      case '\f': out.append("\\f"); break;
      case '\n': out.append("\\n"); break;
      case '\r': out.append("\\r"); break;
      case '\t': out.append("\\t"); break;
      default: {
        char u[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
        out.append(u, 6);
      }
    }
    p = q + 1;
  }
  out.push_back('"');
}

void JDoc::canonical(uint32_t id, std::string& out) const {
  const JNode& nd = nodes[id];
  switch (nd.kind) {
    case JKind::Null: out.append("null"); return;
    case JKind::False: out.append("false"); return;
    case JKind::True: out.append("true"); return;
    case JKind::Int:
    case JKind::Num: out.append(bytes.data() + nd.a, nd.n); return;
    case JKind::Str:
      if (nd.raw) {  // no escapes in the source: nothing needs escaping
        out.push_back('"');
        out.append(src_ + nd.a, nd.n);
        out.push_back('"');
      } else {
        append_json_string(bytes.data() + nd.a, nd.n, out);
      }
      return;
    case JKind::Arr:
      out.push_back('[');
      for (uint32_t i = 0; i < nd.n; ++i) {
        if (i) out.push_back(',');
        canonical(kids[nd.a + i], out);
      }
      out.push_back(']');
      return;
    case JKind::Obj:
      out.push_back('{');
      for (uint32_t i = 0; i < nd.n; ++i) {
        if (i) out.push_back(',');
        const JNode& k = nodes[kids[nd.a + 2 * i]];
        if (k.raw) {
          out.push_back('"');
          out.append(src_ + k.a, k.n);
          out.push_back('"');
        } else {
          append_json_string(bytes.data() + k.a, k.n, out);
        }
        out.push_back(':');
        canonical(kids[nd.a + 2 * i + 1], out);
      }
      out.push_back('}');
      return;
  }
}

size_t json_plain_run(const char* s, size_t p, size_t end) {
  return plain_run(reinterpret_cast<const uint8_t*>(s), p, end);
}

bool valid_utf8(const char* s, size_t n) {
  const uint8_t* u = reinterpret_cast<const uint8_t*>(s);
  for (size_t p = 0; p < n;) {
    if (u[p] < 0x80) {
      ++p;
      continue;
    }
    size_t len = utf8_len(u, p, n);
    if (!len) return false;
    p += len;
  }
  return true;
}

const char* jkind_name(JKind k) {
  switch (k) {
    case JKind::Null: return "null";
    case JKind::False:
    case JKind::True: return "boolean";
    case JKind::Int: return "integer";
    case JKind::Num: return "number";
    case JKind::Str: return "string";
    case JKind::Arr: return "array";
    case JKind::Obj: return "object";
  }
  return "?";
}

}  // namespace spyglass
