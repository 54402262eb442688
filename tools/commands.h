// The fathom subcommands. Each `add_*` registers its options on the app and returns the
// function to run when it is chosen; failures throw fathom::Error (exit code 2).
#pragma once
#include <functional>

#include <CLI/CLI.hpp>

namespace fathom::cli {

using Command = std::function<void()>;

Command add_info(CLI::App& app);
Command add_logits(CLI::App& app);
Command add_generate(CLI::App& app);
Command add_init_random(CLI::App& app);

}  // namespace fathom::cli
