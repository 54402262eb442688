// Training plots (src/train/plot.h, `fathom train-plot`): a synthetic log becomes loss.png and
// expert-load.png of the promised size, and a missing, empty or malformed log or a missing gnuplot
// is an error that says which. The drawing tests need gnuplot (scripts/setup.sh installs
// gnuplot-nox) and are skipped, saying so, where it is absent (the GPU machine).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <initializer_list>
#include <string>

#include "core/error.h"
#include "core/files.h"
#include "test_util.h"
#include "train/plot.h"

using namespace fathom;
using namespace fathom::test;
using namespace fathom::train;
namespace fs = std::filesystem;

namespace {

bool have_gnuplot() { return std::system("command -v gnuplot >/dev/null 2>&1") == 0; }

#define SKIP_WITHOUT_GNUPLOT() \
  if (!have_gnuplot()) GTEST_SKIP() << "gnuplot is not installed (Debian package gnuplot-nox)"

// A log as `fathom train` writes it: `layers` MoE layers, validation every 10 steps, an MTP loss
// when asked; steps 21..25 appear twice, as after a crash at step 25 and a resume from step 20.
std::string make_log(int steps, int layers, bool mtp) {
  std::string log;
  auto line = [&](int s) {
    std::string loads;
    for (int l = 1; l <= layers; ++l)
      loads += cat(l > 1 ? "," : "", "\"", l, "\":", 1.0 + 2.0 / (1.0 + 0.1 * s) + 0.05 * l);
    log += cat("{\"step\":", s, ",\"loss\":", 10.0 / (1.0 + 0.05 * s), ",\"balance_loss\":0.0001,\"lr\":0.001,",
               "\"grad_norm\":1.25,\"tokens_per_s\":900,\"expert_load_max_over_mean\":{", loads, "}");
    if (mtp) log += cat(",\"mtp_loss\":", 11.0 / (1.0 + 0.04 * s));
    if (s % 10 == 0) log += cat(",\"val_loss\":", 10.5 / (1.0 + 0.05 * s));
    log += "}\n";
  };
  for (int s = 1; s <= std::min(steps, 25); ++s) line(s);
  for (int s = 21; s <= steps; ++s) line(s);
  return log;
}

uint32_t big_endian32(const std::string& b, size_t at) {
  return uint32_t(uint8_t(b[at])) << 24 | uint32_t(uint8_t(b[at + 1])) << 16 | uint32_t(uint8_t(b[at + 2])) << 8 |
         uint32_t(uint8_t(b[at + 3]));
}

// A PNG (signature, then IHDR first) of the plots' size with something drawn in it.
testing::AssertionResult is_plot_png(const std::string& path) {
  const std::string b = slurp(path);
  if (b.size() < 33) return testing::AssertionFailure() << path << " has " << b.size() << " bytes, not a PNG";
  if (b.compare(0, 8, "\x89PNG\r\n\x1a\n") != 0) return testing::AssertionFailure() << path << " lacks the PNG signature";
  if (b.compare(12, 4, "IHDR") != 0) return testing::AssertionFailure() << path << " does not start with IHDR";
  const uint32_t w = big_endian32(b, 16), h = big_endian32(b, 20);
  if (w != uint32_t(kPlotWidth) || h != uint32_t(kPlotHeight))
    return testing::AssertionFailure() << path << " is " << w << "x" << h << ", expected " << kPlotWidth << "x"
                                       << kPlotHeight;
  // an empty 1000x600 frame compresses to a few KB; axes, labels and curves take more
  if (b.size() < 8000) return testing::AssertionFailure() << path << " has only " << b.size() << " bytes";
  return testing::AssertionSuccess();
}

// Only the two PNGs: no temporary data, script or half-written image left beside them.
testing::AssertionResult only_the_plots(const std::string& dir) {
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name != "loss.png" && name != "expert-load.png") return testing::AssertionFailure() << "left behind: " << name;
  }
  return testing::AssertionSuccess();
}

void expect_error(const std::function<void()>& f, std::initializer_list<std::string> needles) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one naming " << *needles.begin();
  } catch (const Error& e) {
    for (const std::string& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
  }
}

// PATH set for the test's lifetime, then restored.
class ScopedPath {
 public:
  explicit ScopedPath(const std::string& value) {
    const char* old = std::getenv("PATH");
    had_ = old != nullptr;
    if (had_) old_ = old;
    setenv("PATH", value.c_str(), 1);
  }
  ~ScopedPath() {
    if (had_) setenv("PATH", old_.c_str(), 1);
    else unsetenv("PATH");
  }

 private:
  bool had_ = false;
  std::string old_;
};

TEST(Plot, ASyntheticLogBecomesBothPngs) {
  SKIP_WITHOUT_GNUPLOT();
  TempDir tmp;
  const std::string log = tmp.file("log.jsonl"), out = tmp.file("plots/new");  // out is created
  write_file_atomic(log, make_log(40, 3, /*mtp=*/true));
  write_training_plots(log, out);
  EXPECT_TRUE(is_plot_png(out + "/loss.png"));
  EXPECT_TRUE(is_plot_png(out + "/expert-load.png"));
  EXPECT_TRUE(only_the_plots(out));
  // drawn again over the old ones: V3's 58 MoE layers (coloured along a bar), no MTP loss
  write_file_atomic(log, make_log(40, 58, /*mtp=*/false));
  write_training_plots(log, out);
  EXPECT_TRUE(is_plot_png(out + "/loss.png"));
  EXPECT_TRUE(is_plot_png(out + "/expert-load.png"));
  EXPECT_TRUE(only_the_plots(out));
}

TEST(Plot, ADenseModelAndASingleStepStillDraw) {
  SKIP_WITHOUT_GNUPLOT();
  TempDir tmp;
  const std::string log = tmp.file("log.jsonl");
  // no expert loads (a dense model): the expert plot is a frame that says so
  write_file_atomic(log, "{\"step\":1,\"loss\":7.5,\"expert_load_max_over_mean\":{}}\n"
                         "{\"step\":2,\"loss\":7.25,\"val_loss\":7.5}\n");
  write_training_plots(log, tmp.path());
  EXPECT_TRUE(is_plot_png(tmp.file("loss.png")));
  EXPECT_TRUE(is_plot_png(tmp.file("expert-load.png")));
  write_file_atomic(log, "{\"step\":1,\"loss\":7.5,\"expert_load_max_over_mean\":{\"1\":2.5}}\n");
  write_training_plots(log, tmp.path());
  EXPECT_TRUE(is_plot_png(tmp.file("loss.png")));
  EXPECT_TRUE(is_plot_png(tmp.file("expert-load.png")));
}

TEST(Plot, AMalformedLineIsAnErrorNamingIt) {
  TempDir tmp;
  const std::string log = tmp.file("log.jsonl"), out = tmp.file("plots");
  const std::string good = "{\"step\":1,\"loss\":7.5}\n{\"step\":2,\"loss\":7.4}\n";
  // cut short, as a killed run leaves its last line
  write_file_atomic(log, good + "{\"step\":3,\"loss\":7.");
  expect_error([&] { write_training_plots(log, out); }, {log, "line 3", "not valid JSON"});
  write_file_atomic(log, good + "\n{\"step\":4}\n");  // the blank line 3 is skipped, still counted
  expect_error([&] { write_training_plots(log, out); }, {"line 4", "\"loss\""});
  write_file_atomic(log, "{\"step\":\"one\",\"loss\":7.5}\n");
  expect_error([&] { write_training_plots(log, out); }, {"line 1", "\"step\""});
  write_file_atomic(log, good + "[1, 2]\n");
  expect_error([&] { write_training_plots(log, out); }, {"line 3", "not a JSON object"});
  write_file_atomic(log, good + "{\"step\":3,\"loss\":7.3,\"val_loss\":\"low\"}\n");
  expect_error([&] { write_training_plots(log, out); }, {"line 3", "\"val_loss\"", "not a finite number"});
  write_file_atomic(log, good + "{\"step\":3,\"loss\":7.3,\"expert_load_max_over_mean\":{\"mlp\":1.5}}\n");
  expect_error([&] { write_training_plots(log, out); }, {"line 3", "\"mlp\"", "not a layer number"});
  EXPECT_FALSE(fs::exists(out + "/loss.png"));
}

TEST(Plot, AnEmptyOrMissingLogIsAnError) {
  TempDir tmp;
  const std::string log = tmp.file("log.jsonl");
  write_file_atomic(log, "");
  expect_error([&] { write_training_plots(log, tmp.path()); }, {log, "no steps"});
  write_file_atomic(log, "\n  \n");
  expect_error([&] { write_training_plots(log, tmp.path()); }, {log, "no steps"});
  expect_error([&] { write_training_plots(tmp.file("nothing.jsonl"), tmp.path()); },
               {tmp.file("nothing.jsonl"), "does not exist"});
  expect_error([&] { write_training_plots(tmp.path(), tmp.path()); }, {"is not a file"});
  EXPECT_FALSE(fs::exists(tmp.file("loss.png")));
}

TEST(Plot, AMissingGnuplotNamesThePackage) {
  TempDir tmp;
  const std::string log = tmp.file("log.jsonl");
  write_file_atomic(log, make_log(5, 2, false));
  fs::create_directories(tmp.file("empty-bin"));
  ScopedPath path(tmp.file("empty-bin"));
  expect_error([&] { write_training_plots(log, tmp.path()); }, {"gnuplot is not installed", "gnuplot-nox"});
  EXPECT_FALSE(fs::exists(tmp.file("loss.png")));
}

// gnuplot stand-ins on PATH: one that fails saying why, one that exits 0 having drawn nothing.
// Either way the error says so, and no PNG and no temporary file is left.
TEST(Plot, AGnuplotFailureIsAnErrorAndLeavesNothing) {
  TempDir tmp;
  const std::string log = tmp.file("log.jsonl"), out = tmp.file("plots"), bin = tmp.file("bin");
  write_file_atomic(log, make_log(5, 2, false));
  fs::create_directories(bin);
  fs::create_directories(out);
  const auto fake = [&](const std::string& body) {
    write_file_atomic(bin + "/gnuplot", "#!/bin/sh\n" + body);
    fs::permissions(bin + "/gnuplot", fs::perms::owner_all);
  };
  ScopedPath path(bin + ":/usr/bin:/bin");
  fake("echo 'line 7: unknown terminal type' >&2\nexit 1\n");
  expect_error([&] { write_training_plots(log, out); }, {"gnuplot", "exit status 1", "unknown terminal type"});
  EXPECT_TRUE(fs::is_empty(out));
  fake("exit 0\n");
  expect_error([&] { write_training_plots(log, out); }, {"gnuplot wrote no loss.png"});
  EXPECT_TRUE(fs::is_empty(out));
}

TEST(Plot, TheTrainPlotCommand) {
  TempDir tmp;
  EXPECT_TRUE(is_user_error(run_fathom({"train-plot", "--log", tmp.file("log.jsonl"), "--out", tmp.file("p")}, tmp),
                            {"log.jsonl", "does not exist"}));
  SKIP_WITHOUT_GNUPLOT();
  const std::string run_dir = tmp.file("run");
  fs::create_directories(run_dir);
  write_file_atomic(run_dir + "/log.jsonl", make_log(30, 2, false));
  const CliRun r = run_fathom({"train-plot", "--log", run_dir + "/log.jsonl"}, tmp);  // --out: the log's directory
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("loss.png"), std::string::npos) << r.out;
  EXPECT_TRUE(is_plot_png(run_dir + "/loss.png"));
  EXPECT_TRUE(is_plot_png(run_dir + "/expert-load.png"));
}

}  // namespace
