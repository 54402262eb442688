// libFuzzer target for the chat-template interpreter. The input is a template source, a 0
// byte, then a JSON messages document (no 0 byte: the whole input is the template and the
// messages are one user turn). Parsing and rendering may fail only with fathom::Error;
// tight limits keep every run small and fast.
#include <cstddef>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/chat_template.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string input(reinterpret_cast<const char*>(data), size);
  size_t split = input.find('\0');
  std::string source = input.substr(0, split);
  nlohmann::ordered_json messages = nlohmann::ordered_json::array({{{"role", "user"}, {"content", "hi"}}});
  if (split != std::string::npos) {
    messages = nlohmann::ordered_json::parse(input.substr(split + 1), nullptr, /*allow_exceptions=*/false);
    if (messages.is_discarded()) return 0;
    if (!messages.is_array()) messages = nlohmann::ordered_json::array({messages});
  }
  fathom::jinja::Options options;
  options.limits.max_depth = 64;
  options.limits.max_loop_iterations = 20'000;
  options.limits.max_output_bytes = 1 << 16;
  options.limits.max_work_bytes = 1 << 22;
  try {
    auto tmpl = fathom::ChatTemplate::parse(source, "fuzz", options);
    fathom::ChatTemplateOptions chat;
    chat.bos_token = "<s>";
    chat.eos_token = "</s>";
    chat.add_generation_prompt = size % 2 == 0;
    tmpl.render(messages, chat);
  } catch (const fathom::Error&) {
  }
  return 0;
}
