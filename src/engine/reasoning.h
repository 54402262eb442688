// Reasoning/answer split for DeepSeek-R1 style output: "<think>\nreasoning\n</think>\n\nanswer".
// R1's chat template already ends the generation prompt with "<think>\n", so the model's output
// may start inside the reasoning and contain only the closing tag (starts_in_reasoning = true).
//
// Exactly these rules, shared by split_reasoning() and ReasoningParser:
//  - The opening tag counts only at the very start of the output; it is removed and the output
//    is reasoning from there. Without it the output is reasoning if starts_in_reasoning, else
//    it is all content and no tag is looked for again.
//  - Inside reasoning, the first closing tag ends it; the tag is removed and the rest is content.
//    No closing tag: everything is reasoning. Later tags in content are ordinary text.
//  - Trimmed: '\n' characters at the start of the reasoning, '\n' characters right before the
//    closing tag, and '\n' characters right after it (the start of the content). Nothing else
//    ('\r', spaces, newlines inside either part are kept). vLLM's deepseek_r1 parser trims none
//    of these; R1 writes them as layout, not as part of either message.
#pragma once
#include <string>
#include <string_view>

namespace fathom {

struct ReasoningDelta {
  std::string reasoning;  // new reasoning bytes (tags and trimmed newlines never included)
  std::string content;    // new answer bytes
};

// Whole-text split: the oracle the streaming parser is tested against.
ReasoningDelta split_reasoning(std::string_view text, bool starts_in_reasoning = false,
                               std::string_view open = "<think>", std::string_view close = "</think>");

class ReasoningParser {
 public:
  // open, close: the non-empty tags (fathom::Error otherwise).
  explicit ReasoningParser(bool starts_in_reasoning = false, std::string open = "<think>",
                           std::string close = "</think>");

  // Feeds the next piece of output; returns what can be told apart now. A tag split across
  // pieces, and newlines that may turn out to precede the closing tag, are held back.
  ReasoningDelta push(std::string_view piece);
  // End of output: returns what was held back, as the whole-text split would place it.
  ReasoningDelta flush();

  bool in_reasoning() const { return state_ == State::ReasoningStart || state_ == State::Reasoning; }

 private:
  enum class State {
    Start,           // nothing decided: the output may still begin with the opening tag
    ReasoningStart,  // after the opening tag (or at the start): drop leading '\n'
    Reasoning,       // inside reasoning, looking for the closing tag
    ContentStart,    // after the closing tag: drop leading '\n'
    Content,         // everything else is content
  };
  bool starts_in_reasoning_;
  std::string open_, close_;
  State state_;
  std::string held_;  // bytes read but not yet placed
};

}  // namespace fathom
