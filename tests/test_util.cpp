#include "test_util.h"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>

#include "core/error.h"

namespace fathom::test {

TempDir::TempDir() {
  std::random_device rd;
  auto base = std::filesystem::temp_directory_path();
  for (;;) {
    auto p = base / ("fathom-test-" + std::to_string(getpid()) + "-" + std::to_string(rd()));
    if (std::filesystem::create_directory(p)) {
      path_ = p.string();
      return;
    }
  }
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string sh_quote(const std::string& s) {
  std::string out = "'";
  for (char ch : s) out += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return out + "'";
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string fathom_binary() {
  const char* e = std::getenv("FATHOM_TEST_BINARY");
  return e && *e ? std::string(e) : std::string(FATHOM_BINARY);
}

CliRun run_fathom(const std::vector<std::string>& args, const TempDir& scratch, const std::string& stdin_text) {
  CliRun r;
  // CLI tests run on the CPU unless they pass --device: the same answers on every machine
  r.command = cat("FATHOM_DEVICE=cpu timeout 60 ", sh_quote(fathom_binary()));
  for (const std::string& a : args) r.command.append(1, ' ').append(sh_quote(a));
  const std::string out_path = scratch.file("cli.stdout"), err_path = scratch.file("cli.stderr");
  std::string in_path = "/dev/null";
  if (!stdin_text.empty()) {
    in_path = scratch.file("cli.stdin");
    std::ofstream(in_path, std::ios::binary) << stdin_text;
  }
  std::string full = cat(r.command, " >", sh_quote(out_path), " 2>", sh_quote(err_path), " <", sh_quote(in_path));
  int rc = std::system(full.c_str());
  if (rc != -1 && WIFEXITED(rc)) r.status = WEXITSTATUS(rc);
  r.out = slurp(out_path);
  r.err = slurp(err_path);
  std::filesystem::remove(out_path);
  std::filesystem::remove(err_path);
  if (!stdin_text.empty()) std::filesystem::remove(in_path);
  return r;
}

testing::AssertionResult is_user_error(const CliRun& r, std::initializer_list<std::string> needles) {
  auto fail = [&]() {
    return testing::AssertionFailure() << "\n  command: " << r.command << "\n  exit status: " << r.status
                                       << "\n  stderr: " << r.err << "\n  ";
  };
  if (r.status == 124) return fail() << "timed out (hang?)";
  if (r.status != 2) return fail() << "expected exit status 2";
  for (const char* crash : {"internal error", "Sanitizer", "runtime error:", "terminate called", "Segmentation",
                            "Aborted", "core dumped", "assert"})
    if (r.err.find(crash) != std::string::npos) return fail() << "stderr reports a crash (" << crash << ")";
  const std::string prefix = "fathom: error: ";
  if (r.err.compare(0, prefix.size(), prefix) != 0) return fail() << "stderr does not start with '" << prefix << "'";
  if (r.err.back() != '\n' || std::count(r.err.begin(), r.err.end(), '\n') != 1)
    return fail() << "stderr is not exactly one line";
  if (r.err.size() > 1000) return fail() << "the message is not one short sentence";
  for (const std::string& n : needles)
    if (r.err.find(n) == std::string::npos) return fail() << "the message does not name '" << n << "'";
  return testing::AssertionSuccess();
}

}  // namespace fathom::test
