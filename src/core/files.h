// Writing files so that a reader never sees half of one: write a temporary file beside the
// target, flush it to disk, rename it over the target. On failure the temporary is removed
// and the target is left as it was.
#pragma once
#include <string>
#include <string_view>
#include <vector>

namespace fathom {

void write_file_atomic(const std::string& path, std::string_view contents);
std::string read_file(const std::string& path);

// The files a command's inputs name: each file itself, or every regular file below a
// directory in sorted order. A missing input, an empty directory or no input at all is a
// fathom::Error starting with `what` ("data prepare", "tokenizer training").
std::vector<std::string> expand_inputs(const std::vector<std::string>& inputs, const std::string& what);

}  // namespace fathom
