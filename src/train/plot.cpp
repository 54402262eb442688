#include "train/plot.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/files.h"

extern char** environ;

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace fathom::train {
namespace {

// What the plots need of one log line.
struct StepRecord {
  double loss = 0;
  std::optional<double> val_loss, mtp_loss;
  std::map<int64_t, double> expert_load;  // MoE layer -> max/mean tokens per expert
};

// A finite number, or an error naming the line and the field. A JSON null is what nlohmann
// writes for a NaN, so an optional field that is null counts as absent.
std::optional<double> number_field(const json& j, const char* key, bool required, const std::string& where) {
  const auto it = j.find(key);
  FATHOM_CHECK(it != j.end() || !required, where, " has no \"", key, "\".");
  if (it == j.end() || (it->is_null() && !required)) return std::nullopt;
  FATHOM_CHECK(it->is_number() && std::isfinite(it->get<double>()), where, ": \"", key, "\" is ", it->dump(),
               ", not a finite number.");
  return it->get<double>();
}

// step -> record, in step order; a step logged twice keeps its last line.
std::map<int64_t, StepRecord> read_log(const std::string& path) {
  std::error_code ec;
  FATHOM_CHECK(fs::exists(path, ec), "training log '", path, "' does not exist (fathom train writes <out>/log.jsonl).");
  FATHOM_CHECK(fs::is_regular_file(path, ec), "training log '", path, "' is not a file.");
  std::ifstream in(path, std::ios::binary);
  FATHOM_CHECK(in.is_open(), "cannot open training log '", path, "': ", std::strerror(errno), ".");
  std::map<int64_t, StepRecord> steps;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = cat("training log '", path, "', line ", n);
    json j;
    try {
      j = json::parse(line);
    } catch (const json::parse_error& e) {
      // a killed run can leave its last line cut short; the position says where it ends
      throw Error(cat(where, " is not valid JSON (at character ", e.byte, ")."));
    }
    FATHOM_CHECK(j.is_object(), where, " is not a JSON object.");
    const auto step = j.find("step");
    FATHOM_CHECK(step != j.end(), where, " has no \"step\".");
    FATHOM_CHECK(step->is_number_integer() && step->get<int64_t>() >= 0, where, ": \"step\" is ", step->dump(),
                 ", not a step number.");
    StepRecord r;
    r.loss = *number_field(j, "loss", true, where);
    r.val_loss = number_field(j, "val_loss", false, where);
    r.mtp_loss = number_field(j, "mtp_loss", false, where);
    if (const auto loads = j.find("expert_load_max_over_mean"); loads != j.end()) {
      FATHOM_CHECK(loads->is_object(), where, ": \"expert_load_max_over_mean\" is not an object of layer: load.");
      for (const auto& [layer, value] : loads->items()) {
        char* end = nullptr;
        errno = 0;
        const long long l = layer.empty() ? -1 : std::strtoll(layer.c_str(), &end, 10);
        FATHOM_CHECK(l >= 0 && errno == 0 && end && *end == '\0', where, ": expert load key \"", layer,
                     "\" is not a layer number.");
        FATHOM_CHECK(value.is_number() && std::isfinite(value.get<double>()), where, ": the expert load of layer ",
                     layer, " is ", value.dump(), ", not a finite number.");
        r.expert_load[l] = value.get<double>();
      }
    }
    steps[step->get<int64_t>()] = std::move(r);
  }
  FATHOM_CHECK(!in.bad(), "cannot read training log '", path, "': ", std::strerror(errno), ".");
  FATHOM_CHECK(!steps.empty(), "training log '", path, "' has no steps (did the run log anything yet?).");
  return steps;
}

// The gnuplot on PATH: found here rather than left to exec, so that its absence is one clear
// sentence before anything is written.
std::string find_gnuplot() {
  const char* env = std::getenv("PATH");
  const std::string path = env ? env : "/usr/local/bin:/usr/bin:/bin";
  size_t start = 0;
  while (start <= path.size()) {
    size_t end = path.find(':', start);
    if (end == std::string::npos) end = path.size();
    const std::string dir = path.substr(start, end - start);
    if (!dir.empty()) {
      const std::string candidate = dir + "/gnuplot";
      std::error_code ec;
      if (::access(candidate.c_str(), X_OK) == 0 && fs::is_regular_file(candidate, ec)) return candidate;
    }
    start = end + 1;
  }
  throw Error(
      "cannot draw the training plots: gnuplot is not installed (no 'gnuplot' on PATH); install the Debian package "
      "gnuplot-nox (apt-get install gnuplot-nox).");
}

// A gnuplot single-quoted string: nothing inside is interpreted but '' for a quote.
std::string quoted(const std::string& s) {
  std::string out = "'";
  for (char ch : s) out += ch == '\'' ? std::string("''") : std::string(1, ch);
  return out + "'";
}

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.17g", v);  // exact, as the log itself writes doubles
  return buf;
}

// Files removed when the plotting ends, however it ends.
class Scratch {
 public:
  explicit Scratch(fs::path dir) : dir_(std::move(dir)) {}
  ~Scratch() {
    std::error_code ec;
    for (const fs::path& p : paths_) fs::remove(p, ec);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  std::string add(const std::string& name) {
    paths_.push_back(dir_ / name);
    return paths_.back().string();
  }

 private:
  fs::path dir_;
  std::vector<fs::path> paths_;
};

// gnuplot's own messages, on one line and not too long, for an error sentence
std::string one_line(std::string text) {
  for (char& ch : text)
    if (ch == '\n' || ch == '\r' || ch == '\t') ch = ' ';
  const size_t first = text.find_first_not_of(' '), last = text.find_last_not_of(' ');
  text = first == std::string::npos ? std::string() : text.substr(first, last - first + 1);
  if (text.size() > 400) text = text.substr(0, 400) + "...";
  return text.empty() ? "no message" : text;
}

// Runs `gnuplot -d SCRIPT` (-d: the user's ~/.gnuplot does not change the plots) without a
// shell, its stderr to err_path; a failure is an error quoting what gnuplot said.
void run_gnuplot(const std::string& gnuplot, const std::string& script, const std::string& err_path,
                 const std::string& out_dir) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::string arg0 = "gnuplot", arg1 = "-d", arg2 = script;
  char* argv[] = {arg0.data(), arg1.data(), arg2.data(), nullptr};
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, gnuplot.c_str(), &actions, nullptr, argv, environ);
  posix_spawn_file_actions_destroy(&actions);
  FATHOM_CHECK(rc == 0, "cannot run ", gnuplot, ": ", std::strerror(rc), ".");
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) throw Error(cat("waiting for ", gnuplot, " failed: ", std::strerror(errno), "."));
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return;
  std::ifstream err(err_path, std::ios::binary);
  const std::string said((std::istreambuf_iterator<char>(err)), std::istreambuf_iterator<char>());
  const std::string how = WIFEXITED(status) ? cat("exit status ", WEXITSTATUS(status))
                                            : cat("killed by signal ", WTERMSIG(status));
  throw Error(cat("gnuplot (", gnuplot, ") failed drawing the plots in '", out_dir, "' (", how, "): ", one_line(said)));
}

// The finished temporary PNG, synced and renamed over the final name.
void publish(const std::string& tmp, const fs::path& final_path) {
  std::error_code ec;
  FATHOM_CHECK(fs::is_regular_file(tmp, ec) && fs::file_size(tmp, ec) > 8, "gnuplot wrote no ",
               final_path.filename().string(), " (expected at ", tmp, ").");
  const int fd = ::open(tmp.c_str(), O_RDONLY | O_CLOEXEC);
  FATHOM_CHECK(fd >= 0, "cannot open ", tmp, ": ", std::strerror(errno), ".");
  const bool synced = ::fsync(fd) == 0;
  const int err = errno;
  ::close(fd);
  FATHOM_CHECK(synced, "cannot write ", final_path.string(), ": fsync: ", std::strerror(err), ".");
  FATHOM_CHECK(::rename(tmp.c_str(), final_path.c_str()) == 0, "cannot write ", final_path.string(), ": renaming ",
               tmp, " to it failed: ", std::strerror(errno), ".");
}

}  // namespace

void write_training_plots(const std::string& log_path, const std::string& out_dir) {
  // Everything that can be wrong with the log is found before gnuplot is looked for, so a bad
  // log says so even where gnuplot is missing.
  const std::map<int64_t, StepRecord> steps = read_log(log_path);
  const std::string gnuplot = find_gnuplot();
  FATHOM_CHECK(out_dir.find_first_of("\n\r") == std::string::npos, "plot directory '", out_dir,
               "' has a line break in its name, which gnuplot cannot take.");
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  FATHOM_CHECK(!ec && fs::is_directory(out_dir), "cannot create plot directory '", out_dir, "': ",
               ec ? ec.message() : std::string("it is not a directory"), ".");

  Scratch scratch(out_dir);
  const std::string tag = ".tmp-" + std::to_string(::getpid());
  const std::string loss_data = scratch.add("loss.dat" + tag), val_data = scratch.add("val-loss.dat" + tag),
                    mtp_data = scratch.add("mtp-loss.dat" + tag), load_data = scratch.add("expert-load.dat" + tag),
                    script = scratch.add("plots.gp" + tag), gnuplot_err = scratch.add("gnuplot.err" + tag),
                    loss_png = scratch.add("loss.png" + tag), load_png = scratch.add("expert-load.png" + tag);

  // The data files: "step value" per line; expert loads one block per layer (gnuplot's `index`).
  std::string loss_rows, val_rows, mtp_rows;
  std::set<int64_t> layers;
  for (const auto& [step, r] : steps) {
    loss_rows += cat(step, ' ', num(r.loss), '\n');
    if (r.val_loss) val_rows += cat(step, ' ', num(*r.val_loss), '\n');
    if (r.mtp_loss) mtp_rows += cat(step, ' ', num(*r.mtp_loss), '\n');
    for (const auto& [layer, load] : r.expert_load) layers.insert(layer);
  }
  std::string load_rows;
  for (const int64_t layer : layers) {
    for (const auto& [step, r] : steps)
      if (const auto it = r.expert_load.find(layer); it != r.expert_load.end())
        load_rows += cat(step, ' ', num(it->second), '\n');
    load_rows += "\n\n";
  }
  write_file_atomic(loss_data, loss_rows);
  if (!val_rows.empty()) write_file_atomic(val_data, val_rows);
  if (!mtp_rows.empty()) write_file_atomic(mtp_data, mtp_rows);
  if (!load_rows.empty()) write_file_atomic(load_data, load_rows);

  // A single step draws as a point: a line through one point is invisible.
  const std::string style = steps.size() > 1 ? "lines lw 2" : "points pt 7 ps 1.5";
  std::string gp = cat("set terminal pngcairo size ", kPlotWidth, ",", kPlotHeight, " font ',11' noenhanced\n",
                       "set grid\nset xlabel 'step'\n");
  gp += cat("set output ", quoted(loss_png), "\n", "set title 'Training loss'\n",
            "set ylabel 'loss (nats per token)'\nset key top right\n");
  gp += cat("plot ", quoted(loss_data), " using 1:2 with ", style, " lc rgb '#1f77b4' title 'train loss'");
  if (!mtp_rows.empty())
    gp += cat(", ", quoted(mtp_data), " using 1:2 with ", style, " lc rgb '#2ca02c' title 'MTP loss'");
  if (!val_rows.empty())
    gp += cat(", ", quoted(val_data), " using 1:2 with linespoints lw 1.5 pt 7 ps 1.2 lc rgb '#d62728' ",
              "title 'validation loss'");
  gp += "\n";

  gp += cat("set output ", quoted(load_png), "\n",
            "set title 'Expert load per MoE layer: max/mean tokens per expert (1 = even)'\n",
            "set ylabel 'max / mean expert load'\nset key outside right top\n",
            // room above and below, so the even-load line at 1 is not hidden in the frame
            "set offsets 0, 0, graph 0.05, graph 0.05\n");
  if (layers.empty()) {
    // a dense model, or a log without loads: an empty frame that says so, not a stale picture
    const int64_t first = steps.begin()->first, last = steps.rbegin()->first;
    gp += cat("set xrange [", first - 1, ":", last + 1, "]\nset yrange [0:2]\n",
              "set label 1 'no MoE layer loads in this log' at graph 0.5,0.5 center\nplot NaN notitle\n");
  } else {
    // Up to ten layers each get a colour and a key entry; more (61 in V3) are coloured by layer
    // number along a colour bar, where a key would bury the plot.
    const bool by_palette = layers.size() > 10;
    if (by_palette)
      gp += cat("set palette defined (0 '#440154', 0.5 '#21908d', 1 '#fde725')\nset cbrange [", *layers.begin(), ":",
                *layers.rbegin() + (layers.size() == 1 ? 1 : 0), "]\nset cblabel 'MoE layer'\n");
    gp += "plot ";
    int64_t block = 0;
    for (const int64_t layer : layers) {
      gp += cat(quoted(load_data), " index ", block++, " using 1:2 with ", style);
      gp += by_palette ? cat(" lc palette cb ", layer, " notitle, ") : cat(" title 'layer ", layer, "', ");
    }
    gp += "1 with lines dt 2 lw 1.5 lc rgb 'gray40' title 'even load'\n";
  }
  gp += "unset output\n";
  write_file_atomic(script, gp);

  run_gnuplot(gnuplot, script, gnuplot_err, out_dir);
  publish(loss_png, fs::path(out_dir) / "loss.png");
  publish(load_png, fs::path(out_dir) / "expert-load.png");
}

}  // namespace fathom::train
