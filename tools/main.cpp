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
  add(fathom::cli::add_tokenize);
  add(fathom::cli::add_detokenize);
  add(fathom::cli::add_chat_template);
  add(fathom::cli::add_chat);
  add(fathom::cli::add_data);
  add(fathom::cli::add_train);
  add(fathom::cli::add_train_plot);
  add(fathom::cli::add_tokenizer);
  add(fathom::cli::add_convert);
  add(fathom::cli::add_eval);
  add(fathom::cli::add_serve);
  // CLI11 reports a mistyped subcommand (or an option before any subcommand) as "A
  // subcommand is required"; name what was given instead.
  if (argc > 1 && argv[1][0] == '-' && std::string(argv[1]) != "-h" && std::string(argv[1]) != "--help") {
    std::string known;
    for (const auto& [sub, run] : commands) known += (known.empty() ? "" : ", ") + sub->get_name();
    std::fprintf(stderr, "fathom: error: unknown option '%s' (expected a subcommand: %s)\n", argv[1], known.c_str());
    return 2;
  }
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
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // Usage errors in the same one-line form as every other error.
    std::string which;
    for (const auto& [sub, run] : commands)
      if (sub->parsed()) which = sub->get_name() + " ";
    std::fprintf(stderr, "fathom: error: %s (see 'fathom %s--help')\n", e.what(), which.c_str());
    return 2;
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
