// The fathom command line. Exit codes: 0 success, 2 bad input or usage (a one-sentence
// message on stderr), 1 an internal error.
#include <cstdio>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "commands.h"
#include "core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"fathom: run and train DeepSeek-architecture language models"};
  app.require_subcommand(1);
  std::vector<std::pair<CLI::App*, fathom::cli::Command>> commands;
  auto add = [&](fathom::cli::Command (*adder)(CLI::App&)) {
    size_t before = app.get_subcommands({}).size();
    fathom::cli::Command cmd = adder(app);
    commands.emplace_back(app.get_subcommands({})[before], std::move(cmd));
  };
  add(fathom::cli::add_info);
  add(fathom::cli::add_logits);
  add(fathom::cli::add_generate);
  add(fathom::cli::add_init_random);
  // CLI11 reports a mistyped subcommand as "A subcommand is required"; name it instead.
  if (argc > 1 && argv[1][0] != '-') {
    std::string known;
    bool found = false;
    for (const auto& [sub, run] : commands) {
      known += (known.empty() ? "" : ", ") + sub->get_name();
      found = found || sub->check_name(argv[1]);
    }
    if (!found) {
      std::fprintf(stderr, "fathom: error: unknown subcommand '%s' (expected one of %s)\n", argv[1], known.c_str());
      return 2;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  try {
    for (auto& [sub, run] : commands)
      if (sub->parsed()) run();
  } catch (const fathom::Error& e) {
    std::fprintf(stderr, "fathom: error: %s\n", e.what());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "fathom: error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fathom: internal error: %s\n", e.what());
    return 1;
  }
  return 0;
}
