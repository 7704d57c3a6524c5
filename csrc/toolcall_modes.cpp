// Llama-3 JSON and Mistral front-ends of the tool-call scanner (see toolcall.h; the format is
// specified in engine/toolcall.py). Both find a call's JSON value lexically (brackets counted
// outside strings) so that streaming stays one pass, then hand the parsed value to the shared
// call-object rules in toolcall.cpp.
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
  in_str_ = false;
}

// A value's extent: from '{' or '[' to the bracket that closes the first one (brackets of
// either kind counted outside strings); from '"' to its closing quote; otherwise, or if it
// never closes, to the end of the text.
void Scanner::value(const char* buf, size_t n, bool final, ParseOut& out, bool& wait) {
  size_t p = p_;
  bool closed = false;
  const char c0 = val_start_ < n ? buf[val_start_] : 0;
  if (c0 == '{' || c0 == '[' || c0 == '"') {
    while (p < n && !closed) {
      const char c = buf[p];
      if (in_str_) {
        if (c == '\\') {
          if (p + 1 >= n) break;
          p += 2;
          continue;
        }
        if (c == '"') {
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
      ++p;
    }
  }
  if (!closed && !final) {
    p_ = p;
    wait = true;
    return;
  }
  finish_value(buf, closed ? p : n, out);
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
