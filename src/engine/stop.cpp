#include "engine/stop.h"

#include <algorithm>

#include "core/error.h"

namespace fathom {

StopMatcher::StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {
  for (size_t i = 0; i < stops_.size(); ++i)
    FATHOM_CHECK(!stops_[i].empty(), "stop string ", i, " is empty; stop strings need at least one character");
}

std::string StopMatcher::push(std::string_view piece) {
  if (stopped_) return "";
  held_.append(piece);

  // held_ had no complete stop before this piece, so every match found now ends in the piece.
  size_t best_start = std::string::npos, best_end = std::string::npos;
  const std::string* best = nullptr;
  for (const std::string& s : stops_) {
    const size_t start = held_.find(s);
    if (start == std::string::npos) continue;
    const size_t end = start + s.size();
    if (best == nullptr || end < best_end || (end == best_end && start < best_start)) {
      best_start = start, best_end = end, best = &s;
    }
  }
  if (best != nullptr) {
    stopped_ = true;
    matched_ = *best;
    std::string out = held_.substr(0, best_start);
    held_.clear();
    return out;
  }

  // Hold back the longest tail of held_ that is a proper prefix of some stop string.
  size_t hold = 0;
  for (const std::string& s : stops_) {
    for (size_t len = std::min(s.size() - 1, held_.size()); len > hold; --len) {
      if (held_.compare(held_.size() - len, len, s, 0, len) == 0) {
        hold = len;
        break;
      }
    }
  }
  std::string out = held_.substr(0, held_.size() - hold);
  held_.erase(0, held_.size() - hold);
  return out;
}

std::string StopMatcher::flush() {
  std::string out;
  out.swap(held_);
  return out;
}

}  // namespace fathom
