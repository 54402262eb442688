// fathom train-plot --log FILE [--out DIR]: loss.png and expert-load.png from a training run's
// log (src/train/plot.h), drawn by gnuplot.
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>

#include "commands.h"
#include "train/plot.h"

namespace fathom::cli {

Command add_train_plot(CLI::App& app) {
  auto log = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand("train-plot", "draw loss.png and expert-load.png from a training log (needs gnuplot)");
  cmd->add_option("--log", *log, "the run's JSONL log (<out>/log.jsonl of fathom train)")->required();
  cmd->add_option("--out", *out, "directory for the PNGs (created when missing; default: the log's directory)");
  return [=] {
    std::string dir = *out;
    if (dir.empty()) {
      dir = std::filesystem::path(*log).parent_path().string();
      if (dir.empty()) dir = ".";
    }
    train::write_training_plots(*log, dir);
    const std::filesystem::path d(dir);
    std::printf("wrote %s and %s\n", (d / "loss.png").c_str(), (d / "expert-load.png").c_str());
  };
}

}  // namespace fathom::cli
