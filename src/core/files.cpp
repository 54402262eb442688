#include "core/files.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <unistd.h>

#include "core/error.h"

namespace fathom {

void write_file_atomic(const std::string& path, std::string_view contents) {
  const std::string tmp = path + ".tmp." + std::to_string(getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  FATHOM_CHECK(fd >= 0, "cannot write ", path, ": ", std::strerror(errno));
  size_t done = 0;
  while (done < contents.size()) {
    ssize_t n = ::write(fd, contents.data() + done, contents.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      throw Error(cat("cannot write ", path, ": ", std::strerror(err)));
    }
    done += size_t(n);
  }
  // A full disk may show only here (delayed allocation, network file systems): both results
  // count, and the descriptor is closed either way.
  const int sync_rc = ::fsync(fd);
  const int sync_err = errno;
  const int close_rc = ::close(fd);
  if (sync_rc != 0 || close_rc != 0) {
    int err = sync_rc != 0 ? sync_err : errno;
    ::unlink(tmp.c_str());
    throw Error(cat("cannot write ", path, ": ", std::strerror(err)));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    throw Error(cat("cannot write ", path, ": ", std::strerror(err)));
  }
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  FATHOM_CHECK(in.good(), "cannot open ", path, ": ", std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<std::string> expand_inputs(const std::vector<std::string>& inputs, const std::string& what) {
  namespace fs = std::filesystem;
  FATHOM_CHECK(!inputs.empty(), what, ": no input files were given.");
  std::vector<std::string> files;
  for (const std::string& in : inputs) {
    std::error_code ec;
    const fs::file_status st = fs::status(in, ec);
    FATHOM_CHECK(!ec && fs::exists(st), what, ": input '", in, "' does not exist.");
    if (fs::is_directory(st)) {
      std::vector<std::string> below;
      for (const auto& e : fs::recursive_directory_iterator(in, fs::directory_options::skip_permission_denied))
        if (e.is_regular_file()) below.push_back(e.path().string());
      std::sort(below.begin(), below.end());
      FATHOM_CHECK(!below.empty(), what, ": directory '", in, "' holds no files.");
      files.insert(files.end(), below.begin(), below.end());
    } else {
      FATHOM_CHECK(fs::is_regular_file(st), what, ": input '", in, "' is not a regular file.");
      files.push_back(in);
    }
  }
  return files;
}

}  // namespace fathom
