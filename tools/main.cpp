// The fathom command line: subcommands registered in tools/commands.h.
#include <cstdio>
#include <exception>

#include <CLI/CLI.hpp>

#include "core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"fathom: run and train DeepSeek-architecture language models"};
  app.require_subcommand(1);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  return 0;
}
