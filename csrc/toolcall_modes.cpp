// Llama-3 JSON and Mistral front-ends of the tool-call scanner (see toolcall.h; the format is
// specified in engine/toolcall.py). Both find a call's JSON value lexically (brackets counted
// outside strings) so that streaming stays one pass, then hand the parsed value to the shared
// call-object rules in toolcall.cpp.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string_view>

#include "toolcall.h"

namespace spyglass {

using namespace tags;  // NOLINT: the tag constants and match()

// Outside blocks in llama3_json / mistral mode: text up to the next '<' (think/answer tags,
// <|python_tag|>) or the mode's opener byte ('{' while text_outside is blank / '[TOOL_CALLS]').
void Scanner::outside_alt(const char* buf, size_t n, bool final, bool& wait) {
  const bool llama = tools_->mode == Mode::Llama3Json;
  const char opener = llama ? '{' : '[';
  while (p_ < n) {
    size_t q = p_;
    while (q < n && buf[q] != '<' && buf[q] != opener) ++q;
    add_outside(buf + p_, q - p_);
    p_ = q;
    if (q >= n) return;
    if (buf[q] == '<') {
      int t = tag_at(buf, n, q, final);
      if (t < 0) {
        wait = true;
        return;
      }
      if (t > 0) {
        if (st_ != St::Outside) return;
        continue;
      }
    } else if (llama) {
      if (outside_blank_) {
        open_block(q);
        begin_value(q, false);
        return;
      }
    } else {
      int m = match(buf, n, q, kToolCalls);
      if (m == 1) {
        open_block(q);
        st_ = St::Lead;
        lead_args_ = false;
        p_ = q + len(kToolCalls);
        return;
      }
      if (m < 0 && !final) {
        wait = true;
        return;
      }
    }
    add_outside(buf + q, 1);
    p_ = q + 1;
  }
}

void Scanner::add_outside(const char* p, size_t len) {
  for (size_t i = 0; outside_blank_ && i < len; ++i) outside_blank_ = is_ws(p[i]);
  outside_.append(p, len);
}

// Blanks after <|python_tag|> / [TOOL_CALLS] / [ARGS], then the value (or a Mistral v11 name).
void Scanner::lead(const char* buf, size_t n, bool final, bool& wait) {
  while (p_ < n && is_ws(buf[p_])) ++p_;
  if (p_ >= n && !final) {
    wait = true;
    return;
  }
  if (lead_args_ || tools_->mode == Mode::Llama3Json) {
    begin_value(p_, lead_args_);
    return;
  }
  if (p_ < n && buf[p_] == '{') {
    begin_value(p_, false);
    return;
  }
  if (p_ < n && buf[p_] == '[') {  // a JSON array, unless it is a tag: [ARGS] etc. (empty name)
    int a = match(buf, n, p_, kArgs), c = match(buf, n, p_, kCallId);
    int t = match(buf, n, p_, kToolCalls);
    if (a != 1 && c != 1 && t != 1) {
      if ((a < 0 || c < 0 || t < 0) && !final) {
        wait = true;
        return;
      }
      begin_value(p_, false);
      return;
    }
  }
  st_ = St::Name;
  name_start_ = p_;
  in_id_ = false;
}

// Mistral v11+: NAME up to the first '[' or '{', then [ARGS] (or [CALL_ID]ID[ARGS], or '{').
void Scanner::name(const char* buf, size_t n, bool final, ParseOut& out, bool& wait) {
  size_t q = p_;
  while (q < n && buf[q] != '[' && (in_id_ || buf[q] != '{')) ++q;
  p_ = q;
  if (q >= n && !final) {
    wait = true;
    return;
  }
  if (!in_id_) name_end_ = q;
  if (q < n && buf[q] == '{') {
    begin_value(q, true);
    return;
  }
  if (q < n) {
    int a = match(buf, n, q, kArgs);
    if (a == 1) {
      st_ = St::Lead;
      lead_args_ = true;
      p_ = q + len(kArgs);
      return;
    }
    int c = in_id_ ? 0 : match(buf, n, q, kCallId);
    if (c == 1) {
      in_id_ = true;
      p_ = q + len(kCallId);
      return;
    }
    if ((a < 0 || c < 0) && !final) {
      wait = true;
      return;
    }
  }
  push_error(out, ErrKind::InvalidCall,
             in_id_ ? "expected [ARGS] after the call id" : "expected [ARGS] after the tool name",
             q, tag_start_, q, cur_index_);
  st_ = St::Outside;
}

void Scanner::begin_value(size_t at, bool args) {
  st_ = St::Value;
  val_start_ = p_ = at;
  val_args_ = args;
  depth_ = 0;
  in_str_ = esc_ = false;
  open_at_ = semi_at_ = kNone;
  try_n_ = 0;
}

// 1: the mode's next-block opener starts at buf[p] (mistral: "[TOOL_CALLS]"; llama3_json:
// "<|python_tag|>", or ';' blanks '{'); 0: it does not; -1: buf may end inside one.
int Scanner::opener_at(const char* buf, size_t n, size_t p) {
  if (tools_->mode == Mode::Mistral) return match(buf, n, p, kToolCalls);
  if (buf[p] == '<') return match(buf, n, p, kPyTag);
  size_t q = p == semi_at_ ? semi_q_ : p + 1;  // blanks already seen after this ';'
  while (q < n && is_ws(buf[q])) ++q;
  if (q >= n) {
    semi_at_ = p;
    semi_q_ = q;
    return -1;
  }
  return buf[q] == '{' ? 1 : 0;
}

// A value's extent. Lexically: from '{' or '[' to the bracket that closes the first one
// (brackets of either kind counted outside strings); from '"' to its closing quote; otherwise,
// or if it never closes, to the end of the text. If the first literal opener of the next block
// (opener_at, any byte after the value's first) comes before that, the value is the JSON value
// parsed from its start if that is valid within the limits (the opener sits in one of its
// strings), else it ends at that opener. Cost: a parse that outlives the next block's start is
// inside a string there (an opener outside strings is invalid JSON), so it and the next block's
// parse have opposite string states from there on and the next opener ends one of them: at
// most two parses cover any byte. Streaming: the parse runs to the end of the bytes received
// (or the size limit) and is final once it succeeds, reaches the limit, or fails more than 7
// bytes before the end (a failure that close to the end may be a cut UTF-8 sequence or
// surrogate pair); otherwise it is retried once max(16, a quarter of the bytes since the value's
// start) more have arrived, so the retries cost O(the value's final parse) in all.
void Scanner::value(const char* buf, size_t n, bool final, ParseOut& out, bool& wait) {
  const bool llama = tools_->mode == Mode::Llama3Json;
  const char c0 = val_start_ < n ? buf[val_start_] : 0;
  const bool lex = c0 == '{' || c0 == '[' || c0 == '"';
  size_t p = p_;
  bool closed = false;
  while (open_at_ == kNone && p < n && !closed) {
    const char c = buf[p];
    if (p > val_start_ && (llama ? c == '<' || c == ';' : c == '[')) {
      int m = opener_at(buf, n, p);
      if (m < 0 && !final) {
        p_ = p;
        wait = true;
        return;
      }
      if (m > 0) {
        open_at_ = p;
        break;
      }
    }
    ++p;
    if (!lex) continue;
    if (esc_) {
      esc_ = false;
    } else if (in_str_) {
      if (c == '\\') {
        esc_ = true;
      } else if (c == '"') {
        in_str_ = false;
        closed = depth_ == 0;
      }
    } else if (c == '"') {
      in_str_ = true;
    } else if (c == '{' || c == '[') {
      ++depth_;
    } else if (c == '}' || c == ']') {
      closed = --depth_ == 0;
    }
  }
  p_ = p;
  if (closed) {
    finish_value(buf, p, out);
    return;
  }
  if (open_at_ == kNone) {
    if (!final) {
      wait = true;
      return;
    }
    finish_value(buf, n, out);
    return;
  }
  size_t end = open_at_;
  if (lex) {
    if (!final && n < try_n_) {
      wait = true;
      return;
    }
    const size_t lim = val_start_ + tools_->max_call_bytes;
    const size_t e = std::min(lim, n);
    uint32_t root;
    size_t q;
    if (doc_.parse_prefix(buf, val_start_, e, tools_->max_depth, jerr_, root, q,
                          val_args_ ? 1 : 0)) {
      end = q;
    } else if (!final && e < lim && jerr_.pos + 7 >= n) {
      try_n_ = n + std::max<size_t>(16, (n - val_start_) / 4);
      wait = true;
      return;
    }
  }
  finish_value(buf, end, out);
}

// Parses the value buf[val_start_, end) and emits its call(s); then the mode's next state.
void Scanner::finish_value(const char* buf, size_t end, ParseOut& out) {
  const char* err = nullptr;
  if (val_args_ && name_end_ == name_start_)
    err = "tool call has no name";
  else if (val_args_ && !valid_utf8(buf + name_start_, name_end_ - name_start_))
    err = "tool name is not valid UTF-8";
  uint32_t root = 0;
  if (err) {
    push_error(out, ErrKind::InvalidCall, err, name_start_, tag_start_, end, cur_index_);
  } else if (end - val_start_ > tools_->max_call_bytes) {
    char tmp[160];
    std::snprintf(tmp, sizeof tmp, "tool call body is %zu bytes, more than max_call_bytes=%zu",
                  end - val_start_, tools_->max_call_bytes);
    push_error(out, ErrKind::TooLarge, tmp, val_start_ + tools_->max_call_bytes, tag_start_, end,
               cur_index_);
  } else if (!doc_.parse(buf, val_start_, end, tools_->max_depth, jerr_, root, val_args_)) {
    push_error(out, jerr_.too_deep ? ErrKind::TooDeep : ErrKind::InvalidJson, jerr_.message,
               jerr_.pos, tag_start_, end, cur_index_);
  } else if (val_args_) {
    std::string_view nm(buf + name_start_, name_end_ - name_start_);
    finish_args(nm, name_start_, root, 0, "arguments", 1, end, out);
  } else {
    emit_block(root, end, out);
  }
  p_ = end;
  if (tools_->mode == Mode::Llama3Json) {
    st_ = St::Sep;
    q_ = end;
    semi_ = false;
  } else {
    st_ = St::Outside;
  }
}

// Llama: after a value, blanks ';' blanks '{' open the next call; anything else ends the run of
// calls and the text from the value's end on is scanned as ordinary text.
void Scanner::sep(const char* buf, size_t n, bool final, bool& wait) {
  size_t q = q_;
  for (;;) {
    while (q < n && is_ws(buf[q])) ++q;
    if (q >= n) {
      if (!final) {
        q_ = q;
        wait = true;
        return;
      }
      break;
    }
    if (!semi_ && buf[q] == ';') {
      semi_ = true;
      ++q;
      continue;
    }
    if (semi_ && buf[q] == '{') {
      open_block(q);
      begin_value(q, false);
      return;
    }
    break;
  }
  st_ = St::Outside;  // p_ is still the value's end
}

}  // namespace spyglass
