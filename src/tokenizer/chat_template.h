// Chat templates: the Jinja template in a model's tokenizer_config.json that turns a list
// of messages into the prompt text, rendered the way transformers' apply_chat_template
// does (see jinja.h for the interpreter and what it supports).
#pragma once
#include <string>

#include <nlohmann/json.hpp>

#include "tokenizer/jinja.h"

namespace fathom {

struct ChatTemplateOptions {
  std::string bos_token, eos_token;
  bool add_generation_prompt = false;
  // More template variables (tools, documents, thinking flags...). They override the
  // defaults below but not messages/bos_token/eos_token/add_generation_prompt.
  nlohmann::json extra = nlohmann::json::object();
};

class ChatTemplate {
 public:
  // Throws fathom::Error on syntax errors and unsupported constructs, naming the construct
  // and the line: "chat_template line 3: unsupported tag 'macro'".
  static ChatTemplate parse(const std::string& source, const std::string& name = "chat_template",
                            const jinja::Options& options = {});

  // `messages`: an array of {role, content, ...}. Like transformers, the template also sees
  // tools=none and documents=none unless `options.extra` sets them.
  std::string render(const nlohmann::json& messages, const ChatTemplateOptions& options) const;
  std::string render(const nlohmann::ordered_json& messages, const ChatTemplateOptions& options) const;

  // Renders with arbitrary variables; `context` must be a JSON object.
  std::string render_context(const nlohmann::json& context) const;
  std::string render_context(const nlohmann::ordered_json& context) const;

 private:
  jinja::Template template_;
};

}  // namespace fathom
