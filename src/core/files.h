// Writing files so that a reader never sees half of one: write a temporary file beside the
// target, flush it to disk, rename it over the target. On failure the temporary is removed
// and the target is left as it was.
#pragma once
#include <string>
#include <string_view>

namespace fathom {

void write_file_atomic(const std::string& path, std::string_view contents);
std::string read_file(const std::string& path);

}  // namespace fathom
