#include "engine/reasoning.h"

#include <algorithm>

#include "core/error.h"

namespace fathom {

namespace {

size_t skip_newlines(std::string_view s, size_t i) {
  while (i < s.size() && s[i] == '\n') ++i;
  return i;
}

// Length of the longest proper prefix of `tag` that `s` ends with.
size_t partial_tag_tail(std::string_view s, std::string_view tag) {
  for (size_t len = std::min(tag.size() - 1, s.size()); len > 0; --len)
    if (s.substr(s.size() - len) == tag.substr(0, len)) return len;
  return 0;
}

}  // namespace

ReasoningDelta split_reasoning(std::string_view text, bool starts_in_reasoning, std::string_view open,
                               std::string_view close) {
  FATHOM_CHECK(!open.empty() && !close.empty(), "reasoning tags must not be empty");
  size_t i = 0;
  if (text.substr(0, open.size()) == open) {
    i = open.size();
  } else if (!starts_in_reasoning) {
    return {"", std::string(text)};
  }
  i = skip_newlines(text, i);
  const size_t end = text.find(close, i);
  if (end == std::string_view::npos) return {std::string(text.substr(i)), ""};
  size_t r_end = end;
  while (r_end > i && text[r_end - 1] == '\n') --r_end;
  const size_t c_begin = skip_newlines(text, end + close.size());
  return {std::string(text.substr(i, r_end - i)), std::string(text.substr(c_begin))};
}

ReasoningParser::ReasoningParser(bool starts_in_reasoning, std::string open, std::string close)
    : starts_in_reasoning_(starts_in_reasoning), open_(std::move(open)), close_(std::move(close)),
      state_(State::Start) {
  FATHOM_CHECK(!open_.empty() && !close_.empty(), "reasoning tags must not be empty");
}

ReasoningDelta ReasoningParser::push(std::string_view piece) {
  held_.append(piece);
  ReasoningDelta out;
  for (;;) {
    switch (state_) {
      case State::Start: {
        const size_t n = std::min(held_.size(), open_.size());
        if (held_.compare(0, n, open_, 0, n) == 0) {
          if (n < open_.size()) return out;  // could still become the opening tag
          held_.erase(0, open_.size());
          state_ = State::ReasoningStart;
        } else {
          state_ = starts_in_reasoning_ ? State::ReasoningStart : State::Content;
        }
        break;
      }
      case State::ReasoningStart:
      case State::ContentStart: {
        held_.erase(0, skip_newlines(held_, 0));
        if (held_.empty()) return out;
        state_ = state_ == State::ReasoningStart ? State::Reasoning : State::Content;
        break;
      }
      case State::Reasoning: {
        const size_t end = held_.find(close_);
        if (end != std::string::npos) {
          size_t r_end = end;
          while (r_end > 0 && held_[r_end - 1] == '\n') --r_end;
          out.reasoning.append(held_, 0, r_end);
          held_.erase(0, end + close_.size());
          state_ = State::ContentStart;
          break;
        }
        // Hold a partial closing tag and the newlines before it: they vanish if the tag completes.
        size_t keep = held_.size() - partial_tag_tail(held_, close_);
        while (keep > 0 && held_[keep - 1] == '\n') --keep;
        out.reasoning.append(held_, 0, keep);
        held_.erase(0, keep);
        return out;
      }
      case State::Content:
        out.content += held_;
        held_.clear();
        return out;
    }
  }
}

ReasoningDelta ReasoningParser::flush() {
  ReasoningDelta out;
  switch (state_) {
    case State::Start:  // a prefix of the opening tag that never completed is plain text
      if (starts_in_reasoning_) {
        out.reasoning = std::string(held_, skip_newlines(held_, 0));
      } else {
        out.content = held_;
      }
      break;
    case State::ReasoningStart:
    case State::ContentStart:
      break;  // only newlines were held, and those are trimmed
    case State::Reasoning:
      out.reasoning = held_;
      break;
    case State::Content:
      out.content = held_;
      break;
  }
  held_.clear();
  return out;
}

}  // namespace fathom
