// Helpers shared by the tests.
#pragma once
#include <cmath>
#include <filesystem>
#include <initializer_list>

#include <gtest/gtest.h>
#include <string>
#include <vector>

#include "core/safetensors.h"
#include "core/tensor.h"

namespace fathom::test {

inline std::string fixture_dir(const std::string& name) { return std::string(FATHOM_SHARED_DATA) + "/fixtures/" + name; }
// The fathom program the CLI tests run: the build's, or FATHOM_TEST_BINARY's where the tests run
// from a packed copy on another machine (scripts/device-serve-env.sh sets it).
std::string fathom_binary();

// ‖a − b‖ / ‖b‖ over n floats (NaN anywhere gives NaN, which fails every bound).
inline double rel_err(const float* a, const float* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    double d = double(a[i]) - double(b[i]);
    num += d * d;
    den += double(b[i]) * double(b[i]);
  }
  return std::sqrt(num) / std::sqrt(den);
}

// Rows of an I64 [B, T] tensor as int32 vectors.
inline std::vector<std::vector<int32_t>> id_rows(const Tensor& t) {
  const int64_t B = t.dim(0), T = t.dim(1);
  std::vector<std::vector<int32_t>> rows(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < T; ++i) rows[size_t(b)].push_back(int32_t(t.ptr<int64_t>()[b * T + i]));
  return rows;
}

// A fresh, empty temporary directory removed when the object dies.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// ---- running the `fathom` binary

std::string sh_quote(const std::string& s);
std::string slurp(const std::string& path);

struct CliRun {
  int status = -1;  // the exit code; -1 when the process did not exit normally
  std::string out, err;
  std::string command;
};

// Runs `fathom ARGS...` under `timeout 60`, capturing stdout and stderr in files of `scratch`;
// stdin is `stdin_text` (empty: /dev/null).
CliRun run_fathom(const std::vector<std::string>& args, const TempDir& scratch, const std::string& stdin_text = "");

// Exit code 2 and exactly one line "fathom: error: <sentence>" on stderr that names every needle.
testing::AssertionResult is_user_error(const CliRun& r, std::initializer_list<std::string> needles);

}  // namespace fathom::test
