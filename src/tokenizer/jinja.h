// A small interpreter for the subset of Jinja2 that HuggingFace chat templates use.
//
// The goal is byte-exact agreement with Python jinja2 as transformers runs it
// (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols, a tojson that
// is json.dumps(ensure_ascii=False)). Values follow Python: none renders "None", booleans
// "True"/"False", lists and dicts render as their Python repr, undefined names render
// empty and are falsy, but reading an attribute of an undefined name is an error.
//
// Anything outside the subset (macro, call, include, extends, block, filter blocks, unknown
// filters or tests) is rejected at parse time with a fathom::Error naming the construct
// and the line. Rendering is bounded by Limits, so a hostile template fails with an
// Error instead of exhausting the stack, the CPU or memory.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

namespace fathom::jinja {

// Bounds on one render (and on parse nesting). The defaults are generous for real chat
// templates; a fuzzer passes smaller ones.
struct Limits {
  int max_depth = 200;                          // nesting of expressions/statements/values
  int64_t max_loop_iterations = 1'000'000;      // all for-loop iterations in one render
  size_t max_output_bytes = 64u << 20;          // the rendered text, and any one string
  size_t max_work_bytes = 1024u << 20;          // bytes of strings/lists built while rendering
};

// Environment flags. The defaults are the ones transformers uses for chat templates
// (jinja2's own defaults are trim_blocks=false, lstrip_blocks=false).
struct Options {
  bool trim_blocks = true;             // drop the newline right after a block tag
  bool lstrip_blocks = true;           // strip spaces/tabs before a block tag at line start
  bool keep_trailing_newline = false;  // jinja2 drops one trailing newline of the source
  Limits limits;
};

struct Program;  // the parsed template (jinja_ast.h)

class Template {
 public:
  // Throws fathom::Error "<name> line N: ..." on syntax errors and unsupported constructs.
  static Template parse(const std::string& source, const std::string& name = "template",
                        const Options& options = {});

  // `context` must be an object; its members become the template's variables. An ordered
  // json keeps the key order of dicts (what tojson prints); nlohmann::json sorts keys.
  // Throws fathom::Error "<name> line N: ..." on runtime errors, including raise_exception.
  std::string render(const nlohmann::json& context) const;
  std::string render(const nlohmann::ordered_json& context) const;

  const std::string& name() const;

 private:
  std::shared_ptr<const Program> program_;
};

}  // namespace fathom::jinja
