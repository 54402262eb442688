// Lexer: template source -> tokens. It mirrors jinja2's: text runs until "{{", "{%" or
// "{#"; '-' on a tag strips the neighbouring whitespace, '+' turns lstrip/trim off for that
// tag; with lstrip_blocks the spaces before a block or comment tag that starts its line are
// dropped, and with trim_blocks the newline right after one is. A tag ends at "}}"/"%}" only
// when no bracket is open, so dict literals work.
#include <algorithm>
#include <cerrno>
#include <cstring>

#include "tokenizer/jinja_ast.h"

namespace fathom::jinja {
namespace {

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
bool is_name_start(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool is_digit(char c) { return c >= '0' && c <= '9'; }

std::string rstrip_space(std::string s) {
  while (!s.empty() && is_space(s.back())) s.pop_back();
  return s;
}

class Lexer {
 public:
  Lexer(std::string source, const std::string& name, const Options& options)
      : src_(std::move(source)), name_(name), opt_(options) {}

  std::vector<Token> run() {
    while (pos_ < src_.size()) {
      size_t open = find_tag_open(pos_);
      if (open == std::string::npos) {
        emit_text(src_.substr(pos_), line_);
        advance_to(src_.size());
        break;
      }
      char kind = src_[open + 1];
      char sign = open + 2 < src_.size() && (src_[open + 2] == '-' || src_[open + 2] == '+') ? src_[open + 2] : 0;
      emit_text(strip_before_tag(src_.substr(pos_, open - pos_), kind, sign), line_);
      advance_to(open + 2 + (sign ? 1 : 0));
      if (kind == '#') {
        lex_comment();
      } else if (kind == '%' && at_raw()) {
        lex_raw();
      } else {
        lex_tag(kind == '{');
      }
    }
    out_.push_back({Token::Eof, "", line_});
    return std::move(out_);
  }

 private:
  [[noreturn]] void fail(int line, const std::string& msg) const { throw Error(cat(name_, " line ", line, ": ", msg)); }

  size_t find_tag_open(size_t from) const {
    for (size_t p = src_.find('{', from); p != std::string::npos; p = src_.find('{', p + 1))
      if (p + 1 < src_.size() && (src_[p + 1] == '{' || src_[p + 1] == '%' || src_[p + 1] == '#')) return p;
    return std::string::npos;
  }

  void advance_to(size_t p) {
    line_ += int(std::count(src_.begin() + long(pos_), src_.begin() + long(p), '\n'));
    pos_ = p;
  }

  void emit_text(std::string text, int line) {
    if (!text.empty()) out_.push_back({Token::Text, std::move(text), line});
  }

  // The whitespace control applied to the text before a tag.
  std::string strip_before_tag(std::string text, char kind, char sign) const {
    if (sign == '-') return rstrip_space(std::move(text));
    if (sign == '+' || !opt_.lstrip_blocks || kind == '{') return text;
    size_t line_start = text.rfind('\n') + 1;  // npos + 1 == 0
    if ((line_start > 0 || line_starting_) && line_start < text.size() &&
        std::all_of(text.begin() + long(line_start), text.end(), [](char c) { return is_space(c); }))
      text.resize(line_start);
    return text;
  }

  // After a tag's closing marker: '-' eats all whitespace, else trim_blocks eats one newline
  // (block and comment tags only).
  void after_tag_end(char sign, bool is_block) {
    line_starting_ = false;
    if (sign == '-') {
      size_t p = pos_;
      while (p < src_.size() && is_space(src_[p])) ++p;
      line_starting_ = p > pos_ && src_[p - 1] == '\n';
      advance_to(p);
    } else if (sign != '+' && is_block && opt_.trim_blocks && pos_ < src_.size() && src_[pos_] == '\n') {
      advance_to(pos_ + 1);
      line_starting_ = true;
    }
  }

  void lex_comment() {
    int start_line = line_;
    size_t end = src_.find("#}", pos_);
    if (end == std::string::npos) fail(start_line, "unterminated comment: missing '#}'");
    char sign = end > pos_ && (src_[end - 1] == '-' || src_[end - 1] == '+') ? src_[end - 1] : 0;
    advance_to(end + 2);
    after_tag_end(sign, true);
  }

  // `{% raw %}` ... `{% endraw %}`: the text in between is not interpreted.
  bool at_raw() const {
    size_t p = pos_;
    while (p < src_.size() && is_space(src_[p])) ++p;
    if (src_.compare(p, 3, "raw") != 0) return false;
    p += 3;
    while (p < src_.size() && is_space(src_[p])) ++p;
    return src_.compare(p, 2, "%}") == 0 || src_.compare(p, 3, "-%}") == 0 || src_.compare(p, 3, "+%}") == 0;
  }

  // Matches `{%[-+]? endraw [-+]?%}` at p; returns the end of the match or npos.
  size_t match_endraw(size_t p, char& open_sign, char& close_sign) const {
    if (src_.compare(p, 2, "{%") != 0) return std::string::npos;
    p += 2;
    open_sign = p < src_.size() && (src_[p] == '-' || src_[p] == '+') ? src_[p++] : 0;
    while (p < src_.size() && is_space(src_[p])) ++p;
    if (src_.compare(p, 6, "endraw") != 0) return std::string::npos;
    p += 6;
    while (p < src_.size() && is_space(src_[p])) ++p;
    close_sign = p < src_.size() && (src_[p] == '-' || src_[p] == '+') ? src_[p++] : 0;
    if (src_.compare(p, 2, "%}") != 0) return std::string::npos;
    return p + 2;
  }

  void lex_raw() {
    int start_line = line_;
    size_t close = src_.find("%}", pos_);
    char sign = src_[close - 1] == '-' || src_[close - 1] == '+' ? src_[close - 1] : 0;
    advance_to(close + 2);
    after_tag_end(sign, true);
    for (size_t p = src_.find("{%", pos_); p != std::string::npos; p = src_.find("{%", p + 1)) {
      char open_sign = 0, close_sign = 0;
      size_t end = match_endraw(p, open_sign, close_sign);
      if (end == std::string::npos) continue;
      emit_text(strip_before_tag(src_.substr(pos_, p - pos_), '%', open_sign), line_);
      advance_to(end);
      after_tag_end(close_sign, true);
      return;
    }
    fail(start_line, "unterminated 'raw' block: missing '{% endraw %}'");
  }

  void lex_tag(bool is_var) {
    int start_line = line_;
    out_.push_back({is_var ? Token::VarBegin : Token::BlockBegin, "", line_});
    std::string brackets;  // open ( [ { not yet closed
    while (true) {
      size_t p = pos_;
      while (p < src_.size() && is_space(src_[p])) ++p;
      advance_to(p);
      if (pos_ >= src_.size())
        fail(start_line, is_var ? "unterminated expression: missing '}}'" : "unterminated tag: missing '%}'");
      if (brackets.empty()) {
        const char* end = is_var ? "}}" : "%}";
        char sign = 0;
        size_t len = 0;
        if (src_.compare(pos_, 2, end) == 0) len = 2;
        else if ((src_[pos_] == '-' || (!is_var && src_[pos_] == '+')) && src_.compare(pos_ + 1, 2, end) == 0)
          sign = src_[pos_], len = 3;
        if (len) {
          out_.push_back({is_var ? Token::VarEnd : Token::BlockEnd, "", line_});
          advance_to(pos_ + len);
          after_tag_end(sign, !is_var);
          return;
        }
      }
      lex_token(brackets);
    }
  }

  void lex_token(std::string& brackets) {
    char c = src_[pos_];
    if (is_name_start(c)) {
      size_t p = pos_;
      while (p < src_.size() && (is_name_start(src_[p]) || is_digit(src_[p]))) ++p;
      out_.push_back({Token::Name, src_.substr(pos_, p - pos_), line_});
      advance_to(p);
    } else if (is_digit(c)) {
      lex_number();
    } else if (c == '\'' || c == '"') {
      lex_string();
    } else {
      static const char* const ops[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<",
                                        ">",  "=",  ".",  ",",  ":",  "|",  "(", ")", "[", "]", "{", "}"};
      for (const char* op : ops) {
        size_t n = std::strlen(op);
        if (src_.compare(pos_, n, op) != 0) continue;
        if (n == 1 && std::strchr("([{", c)) brackets += c;
        if (n == 1 && std::strchr(")]}", c)) {
          char want = c == ')' ? '(' : c == ']' ? '[' : '{';
          if (brackets.empty() || brackets.back() != want) fail(line_, cat("unexpected '", c, "'"));
          brackets.pop_back();
        }
        out_.push_back({Token::Op, op, line_});
        advance_to(pos_ + n);
        return;
      }
      fail(line_, cat("unexpected character '", c, "' in a tag"));
    }
  }

  // Digits with optional '_' separators; a fraction and/or exponent makes a float.
  void lex_number() {
    auto digits = [&](size_t p, std::string& out) {
      while (p < src_.size() && (is_digit(src_[p]) || (src_[p] == '_' && p + 1 < src_.size() && is_digit(src_[p + 1]))))
        if (src_[p++] != '_') out += src_[p - 1];
      return p;
    };
    std::string text;
    size_t p = digits(pos_, text);
    bool is_float = false;
    if (p + 1 < src_.size() && src_[p] == '.' && is_digit(src_[p + 1])) {
      text += '.';
      p = digits(p + 1, text);
      is_float = true;
    }
    if (p < src_.size() && (src_[p] == 'e' || src_[p] == 'E')) {
      size_t q = p + 1;
      if (q < src_.size() && (src_[q] == '+' || src_[q] == '-')) ++q;
      if (q < src_.size() && is_digit(src_[q])) {
        text += 'e';
        if (src_[p + 1] == '-') text += '-';
        p = digits(q, text);
        is_float = true;
      }
    }
    Token t{is_float ? Token::Float : Token::Int, text, line_};
    if (is_float) {
      t.fval = std::strtod(text.c_str(), nullptr);
    } else {
      errno = 0;
      t.ival = std::strtoll(text.c_str(), nullptr, 10);
      if (errno == ERANGE) fail(line_, cat("integer literal ", text, " does not fit in 64 bits"));
    }
    out_.push_back(t);
    advance_to(p);
  }

  static void append_utf8(uint32_t cp, std::string& out) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6)), out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12)), out += char(0x80 | ((cp >> 6) & 0x3F)), out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18)), out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F)), out += char(0x80 | (cp & 0x3F));
    }
  }

  // Python string-literal escapes (jinja2 decodes literals with "unicode-escape").
  void lex_string() {
    int start_line = line_;
    char quote = src_[pos_];
    std::string value;
    size_t p = pos_ + 1;
    while (true) {
      if (p >= src_.size()) fail(start_line, "unterminated string literal");
      char c = src_[p];
      if (c == quote) break;
      if (c != '\\') {
        value += c;
        ++p;
        continue;
      }
      if (p + 1 >= src_.size()) fail(start_line, "unterminated string literal");
      char e = src_[p + 1];
      p += 2;
      auto hex = [&](int n) {
        uint32_t cp = 0;
        for (int k = 0; k < n; ++k, ++p) {
          char h = p < src_.size() ? src_[p] : 0;
          int d = is_digit(h) ? h - '0' : (h >= 'a' && h <= 'f') ? h - 'a' + 10 : (h >= 'A' && h <= 'F') ? h - 'A' + 10 : -1;
          if (d < 0) fail(start_line, cat("bad \\", e, " escape in a string literal"));
          cp = cp * 16 + uint32_t(d);
        }
        if (cp > 0x10FFFF) fail(start_line, "string escape beyond U+10FFFF");
        append_utf8(cp, value);
      };
      switch (e) {
        case '\n': break;  // line continuation
        case '\\': value += '\\'; break;
        case '\'': value += '\''; break;
        case '"': value += '"'; break;
        case 'n': value += '\n'; break;
        case 't': value += '\t'; break;
        case 'r': value += '\r'; break;
        case 'a': value += '\a'; break;
        case 'b': value += '\b'; break;
        case 'f': value += '\f'; break;
        case 'v': value += '\v'; break;
        case 'x': hex(2); break;
        case 'u': hex(4); break;
        case 'U': hex(8); break;
        case 'N': fail(start_line, "\\N{...} escapes are not supported");
        default:
          if (e >= '0' && e <= '7') {
            uint32_t cp = uint32_t(e - '0');
            for (int k = 0; k < 2 && p < src_.size() && src_[p] >= '0' && src_[p] <= '7'; ++k) cp = cp * 8 + uint32_t(src_[p++] - '0');
            append_utf8(cp, value);
          } else {
            value += '\\';
            value += e;
          }
      }
    }
    out_.push_back({Token::String, std::move(value), start_line});
    advance_to(p + 1);
  }

  std::string src_;
  const std::string& name_;
  const Options& opt_;
  size_t pos_ = 0;
  int line_ = 1;
  bool line_starting_ = true;
  std::vector<Token> out_;
};

}  // namespace

std::vector<Token> lex_template(std::string source, const std::string& name, const Options& options) {
  return Lexer(std::move(source), name, options).run();
}

}  // namespace fathom::jinja
