// A progress bar for long work (loading weights to the GPU, preparing data): drawn on stderr
// when stderr is a terminal, at most ten times a second, and finished with a summary line;
// silent otherwise, so logs and tests see nothing.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace fathom {

class Progress {
 public:
  // `total` units (bytes when `bytes` is set, shown as GiB and GB/s).
  Progress(std::string label, int64_t total, bool bytes = true, bool enabled = true);
  ~Progress();
  void add(int64_t done_units);
  void finish();  // draws the final state and a newline (once)
  // Text shown after the counts (e.g. a training step's loss and tokens/s), from the next draw on.
  void set_note(std::string note) { note_ = std::move(note); }

 private:
  void draw(bool final);
  std::string label_, note_;
  int64_t total_, done_ = 0;
  bool bytes_, enabled_, finished_ = false;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

}  // namespace fathom
