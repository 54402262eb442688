#include "core/progress.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>

namespace fathom {

Progress::Progress(std::string label, int64_t total, bool bytes, bool enabled)
    : label_(std::move(label)), total_(std::max<int64_t>(total, 1)), bytes_(bytes),
      enabled_(enabled && isatty(2) != 0), start_(std::chrono::steady_clock::now()), last_draw_(start_) {
  if (enabled_) draw(false);
}

Progress::~Progress() { finish(); }

void Progress::add(int64_t n) {
  done_ = std::min(total_, done_ + n);
  if (!enabled_) return;
  auto now = std::chrono::steady_clock::now();
  if (now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  draw(false);
}

void Progress::finish() {
  if (finished_) return;
  finished_ = true;
  if (enabled_) draw(true);
}

void Progress::draw(bool final) {
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double frac = double(done_) / double(total_);
  constexpr int width = 30;
  const int filled = int(frac * width);
  char bar[width + 1];
  for (int i = 0; i < width; ++i) bar[i] = i < filled ? '#' : '.';
  bar[width] = 0;
  if (bytes_) {
    const double gib = 1024.0 * 1024.0 * 1024.0;
    std::fprintf(stderr, "\r%s [%s] %5.1f%%  %.2f / %.2f GiB  %.2f GB/s", label_.c_str(), bar, 100 * frac, done_ / gib,
                 total_ / gib, secs > 0 ? done_ / secs / 1e9 : 0.0);
  } else {
    std::fprintf(stderr, "\r%s [%s] %5.1f%%  %lld / %lld", label_.c_str(), bar, 100 * frac, (long long)done_,
                 (long long)total_);
  }
  if (!bytes_ && done_ > 0 && done_ < total_ && secs > 0)
    std::fprintf(stderr, "  ETA %.0f s", secs / double(done_) * double(total_ - done_));
  if (!note_.empty()) std::fprintf(stderr, "  %s", note_.c_str());
  std::fprintf(stderr, "\x1b[K");  // clear what a longer earlier line left
  if (final) std::fprintf(stderr, "  %.1f s\n", secs);
  std::fflush(stderr);
}

}  // namespace fathom
