#include "tokenizer/chat_template.h"

#include "core/error.h"

namespace fathom {

ChatTemplate ChatTemplate::parse(const std::string& source, const std::string& name, const jinja::Options& options) {
  ChatTemplate t;
  t.template_ = jinja::Template::parse(source, name, options);
  return t;
}

// Builds the variables apply_chat_template passes: messages, tools, documents,
// add_generation_prompt and the special tokens, plus the caller's extras.
static nlohmann::ordered_json chat_context(const nlohmann::ordered_json& messages, const ChatTemplateOptions& options,
                                           const std::string& name) {
  FATHOM_CHECK(messages.is_array(), name, ": messages must be a JSON array, not ", messages.type_name());
  FATHOM_CHECK(options.extra.is_object(), name, ": extra template variables must be a JSON object");
  nlohmann::ordered_json context = nlohmann::ordered_json::object();
  context["tools"] = nullptr;
  context["documents"] = nullptr;
  for (auto it = options.extra.begin(); it != options.extra.end(); ++it) context[it.key()] = it.value();
  context["messages"] = messages;
  context["add_generation_prompt"] = options.add_generation_prompt;
  context["bos_token"] = options.bos_token;
  context["eos_token"] = options.eos_token;
  return context;
}

std::string ChatTemplate::render(const nlohmann::json& messages, const ChatTemplateOptions& options) const {
  return template_.render(chat_context(nlohmann::ordered_json(messages), options, template_.name()));
}

std::string ChatTemplate::render(const nlohmann::ordered_json& messages, const ChatTemplateOptions& options) const {
  return template_.render(chat_context(messages, options, template_.name()));
}

std::string ChatTemplate::render_context(const nlohmann::json& context) const { return template_.render(context); }
std::string ChatTemplate::render_context(const nlohmann::ordered_json& context) const {
  return template_.render(context);
}

}  // namespace fathom
