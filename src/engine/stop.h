// Stop strings over streamed text: generated text arrives piece by piece (one detokenized
// token at a time) and a stop string may straddle any number of pieces, so the matcher holds
// back the longest tail that could still grow into a stop string and emits the rest.
//
// Which stop wins: the first one to be completed in the text (smallest end byte); among stops
// completed at the same byte, the longest (earliest start). This depends only on the text, never
// on how it was cut into pieces. Matching is on bytes: a UTF-8 stop string matches exactly its
// bytes, and because it starts on a character boundary the held-back tail does too.
#pragma once
#include <string>
#include <string_view>
#include <vector>

namespace fathom {

class StopMatcher {
 public:
  // stops: non-empty strings (an empty one is a fathom::Error); none = never stops.
  explicit StopMatcher(std::vector<std::string> stops);

  // Feeds the next piece; returns the bytes that are safe to emit now. When a stop string
  // completes, stopped() turns true and the returned text ends right before it; afterwards
  // every push returns "".
  std::string push(std::string_view piece);
  // End of generation: returns what was held back ("" once stopped).
  std::string flush();

  bool stopped() const { return stopped_; }
  const std::string& matched() const { return matched_; }  // the stop string seen, or ""

 private:
  std::vector<std::string> stops_;
  std::string held_;     // bytes not yet emitted: a tail that is a proper prefix of some stop
  bool stopped_ = false;
  std::string matched_;
};

}  // namespace fathom
