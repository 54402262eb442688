// Training plots: the curves of a run drawn from the JSONL log `fathom train` writes
// (<out>/log.jsonl, one object per step), by gnuplot run as an external program (Debian package
// gnuplot-nox). The data goes to gnuplot through temporary files beside the plots, never through
// a shell command line.
//
//   loss.png         training loss against step, the validation loss where it was measured
//                    (points), the MTP loss when the log has one
//   expert-load.png  max/mean tokens per expert of every MoE layer against step (1 = even load):
//                    how well the router's bias keeps the experts balanced, layer by layer
#pragma once

#include <string>

namespace fathom::train {

// The size of both PNGs, in pixels.
constexpr int kPlotWidth = 1000, kPlotHeight = 600;

// Reads log_path and writes out_dir/loss.png and out_dir/expert-load.png (out_dir is created when
// missing; each PNG is written under a temporary name and renamed into place, so a reader never
// sees half of one). A step logged twice (a run resumed from an earlier checkpoint logs the steps
// after it again) counts with its last line. Throws fathom::Error when the log is missing or
// unreadable, a line is not a log entry (naming the line), the log has no steps, or gnuplot is not
// installed or fails.
void write_training_plots(const std::string& log_path, const std::string& out_dir);

}  // namespace fathom::train
