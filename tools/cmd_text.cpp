// fathom tokenize | detokenize | chat-template: the tokenizer and the chat format on their own.
#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "core/error.h"
#include "core/files.h"
#include "text_common.h"
#include "tokenizer/chat_template.h"

namespace fathom::cli {

void add_sampling_options(CLI::App* cmd, SamplingArgs& a) {
  cmd->add_option("--temperature", a.temperature, "sampling temperature; 0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", a.top_k, "keep the k most likely tokens (0 = off)")->capture_default_str();
  cmd->add_option("--top-p", a.top_p, "nucleus sampling mass in (0, 1]")->capture_default_str();
  cmd->add_option("--min-p", a.min_p, "drop tokens below min-p x the top probability")->capture_default_str();
  cmd->add_option("--repetition-penalty", a.repetition_penalty, "> 1 discourages tokens already seen")->capture_default_str();
  cmd->add_option("--presence-penalty", a.presence_penalty, "OpenAI-style, in [-2, 2]")->capture_default_str();
  cmd->add_option("--frequency-penalty", a.frequency_penalty, "OpenAI-style, in [-2, 2]")->capture_default_str();
  cmd->add_option("--seed", a.seed, "random seed (same seed, same output); default: random");
  cmd->add_option("--max-tokens,--max-new-tokens", a.max_tokens, "new tokens at most")->capture_default_str();
  cmd->add_option("--stop", a.stop, "stop string (repeatable); not included in the output");
  cmd->add_flag("--ignore-eos", a.ignore_eos, "do not stop at the end-of-sequence token");
}

GenerateOptions to_generate_options(const SamplingArgs& a) {
  GenerateOptions o;
  auto& s = o.sampling;
  s.temperature = float(a.temperature);
  s.top_k = a.top_k;
  s.top_p = float(a.top_p);
  s.min_p = float(a.min_p);
  s.repetition_penalty = float(a.repetition_penalty);
  s.presence_penalty = float(a.presence_penalty);
  s.frequency_penalty = float(a.frequency_penalty);
  if (a.seed >= 0) {
    s.seed = uint64_t(a.seed);
    s.has_seed = true;
  }
  o.max_tokens = a.max_tokens;
  o.stop = a.stop;
  o.ignore_eos = a.ignore_eos;
  o.validate();
  return o;
}

void apply_generation_config(const CLI::App* cmd, const std::string& model_dir, SamplingArgs& a) {
  namespace fs = std::filesystem;
  const fs::path path = fs::path(model_dir) / "generation_config.json";
  std::error_code ec;
  if (!fs::exists(path, ec)) return;
  nlohmann::json g;
  try {
    g = nlohmann::json::parse(read_file(path.string()));
  } catch (const nlohmann::json::exception& e) {
    throw Error(cat(path.string(), " is not valid JSON: ", e.what()));
  }
  FATHOM_CHECK(g.is_object(), path.string(), " must hold a JSON object");
  auto given = [&](const char* option) { return cmd && cmd->get_option(option)->count() > 0; };
  auto number = [&](const char* key, double& into, const char* option) {
    if (!g.contains(key) || g[key].is_null() || given(option)) return;
    FATHOM_CHECK(g[key].is_number(), path.string(), ": \"", key, "\" must be a number, not ", g[key].dump());
    into = g[key].get<double>();
  };
  bool sample = false;
  if (g.contains("do_sample") && !g["do_sample"].is_null()) {
    FATHOM_CHECK(g["do_sample"].is_boolean(), path.string(), ": \"do_sample\" must be true or false, not ",
                 g["do_sample"].dump());
    sample = g["do_sample"].get<bool>();
  }
  number("repetition_penalty", a.repetition_penalty, "--repetition-penalty");
  if (!sample) return;  // greedy in HF's terms: the command's own defaults stand
  if (!given("--temperature")) a.temperature = 1.0;  // HF's default when do_sample is on
  number("temperature", a.temperature, "--temperature");
  number("top_p", a.top_p, "--top-p");
  number("min_p", a.min_p, "--min-p");
  if (g.contains("top_k") && !g["top_k"].is_null() && !given("--top-k")) {
    FATHOM_CHECK(g["top_k"].is_number_integer() && g["top_k"].get<int64_t>() >= 0 && g["top_k"].get<int64_t>() < (1 << 30),
                 path.string(), ": \"top_k\" must be a non-negative integer, not ", g["top_k"].dump());
    a.top_k = int(g["top_k"].get<int64_t>());
  }
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& model_dir, const std::string& tokenizer_path) {
  namespace fs = std::filesystem;
  if (!tokenizer_path.empty()) return Tokenizer::load(tokenizer_path);
  std::error_code ec;
  FATHOM_CHECK(fs::exists(fs::path(model_dir) / "tokenizer.json", ec), "model directory ", model_dir,
               " has no tokenizer.json; pass --tokenizer PATH (a directory or a tokenizer.json)");
  return Tokenizer::load(model_dir);
}

std::string read_stdin() {
  std::string s;
  char buf[1 << 16];
  for (;;) {
    ssize_t n = ::read(0, buf, sizeof(buf));
    if (n > 0) {
      s.append(buf, size_t(n));
    } else if (n == 0) {
      break;
    } else if (errno != EINTR) {
      throw Error(cat("cannot read standard input: ", std::strerror(errno)));
    }
  }
  return s;
}

std::string render_chat(const Tokenizer& tok, const nlohmann::ordered_json& messages, bool add_generation_prompt,
                        const nlohmann::json& extra) {
  FATHOM_CHECK(!tok.config().chat_template.empty(), "no chat_template in the tokenizer_config.json beside ", tok.source());
  ChatTemplateOptions o;
  o.bos_token = tok.config().bos_token;
  o.eos_token = tok.config().eos_token;
  o.add_generation_prompt = add_generation_prompt;
  o.extra = extra;
  return ChatTemplate::parse(tok.config().chat_template, "chat_template").render(messages, o);
}

void check_tokenizer_fits(const Tokenizer& tok, const Model& model) {
  FATHOM_CHECK(tok.vocab_size() <= model.config().vocab_size, "the tokenizer has ", tok.vocab_size(),
               " ids but the model's vocabulary is ", model.config().vocab_size);
}

namespace {

void write_stdout(std::string_view s) {
  if (!s.empty() && std::fwrite(s.data(), 1, s.size(), stdout) != s.size())
    throw Error("cannot write to standard output");
  std::fflush(stdout);
}

// Ids written as whitespace- or comma-separated integers, a JSON array, or {"ids": [...]}.
std::vector<int32_t> parse_ids(const std::string& text, const Tokenizer& tok) {
  std::vector<int32_t> ids;
  size_t first = text.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && (text[first] == '[' || text[first] == '{')) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      throw Error(cat("standard input is not valid JSON: ", e.what()));
    }
    if (j.is_object()) {
      FATHOM_CHECK(j.contains("ids"), "the JSON on standard input has no \"ids\" field");
      j = j["ids"];
    }
    FATHOM_CHECK(j.is_array(), "expected a JSON array of token ids on standard input");
    for (size_t i = 0; i < j.size(); ++i) {
      FATHOM_CHECK(j[i].is_number_integer(), "id ", i, " on standard input is not an integer: ", j[i].dump());
      const int64_t v = j[i].get<int64_t>();
      FATHOM_CHECK(v >= 0 && v < tok.vocab_size(), "id ", i, " on standard input is ", v,
                   ", outside the vocabulary [0, ", tok.vocab_size(), ")");
      ids.push_back(int32_t(v));
    }
    return ids;
  }
  size_t i = 0;
  while (i < text.size()) {
    const char c = text[i];
    if (c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == ',') {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < text.size() && text[j] >= '0' && text[j] <= '9') ++j;
    size_t end = j;
    while (end < text.size() && !std::strchr(" \t\r\n,", text[end])) ++end;
    const std::string word = text.substr(i, end - i);
    FATHOM_CHECK(j == end && j > i && word.size() <= 9, "\"", utf8_sanitize(word.substr(0, 40)), "\" (token ",
                 ids.size(), " on standard input) is not a token id");
    const int64_t v = std::stoll(word);
    FATHOM_CHECK(v < tok.vocab_size(), "token ", ids.size(), " on standard input is ", v,
                 ", outside the vocabulary [0, ", tok.vocab_size(), ")");
    ids.push_back(int32_t(v));
    i = end;
  }
  return ids;
}

}  // namespace

Command add_tokenize(CLI::App& app) {
  auto path = std::make_shared<std::string>();
  auto json = std::make_shared<bool>(false);
  auto add_special = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand("tokenize", "text on standard input -> token ids (exactly the bytes given)");
  cmd->add_option("--tokenizer", *path, "a directory with tokenizer.json, or the tokenizer.json itself")->required();
  cmd->add_flag("--json", *json, "print {\"ids\": [...]} instead of ids separated by spaces");
  cmd->add_flag("--add-special", *add_special, "add what the tokenizer adds around a text (e.g. BOS)");
  return [=] {
    auto tok = Tokenizer::load(*path);
    const std::string text = read_stdin();
    std::vector<int32_t> ids = tok->encode(text, *add_special);
    std::string out;
    if (*json) {
      out = nlohmann::json{{"ids", ids}}.dump();
    } else {
      for (size_t i = 0; i < ids.size(); ++i) out += (i ? " " : "") + std::to_string(ids[i]);
    }
    write_stdout(out + "\n");
  };
}

Command add_detokenize(CLI::App& app) {
  auto path = std::make_shared<std::string>();
  auto skip = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand("detokenize", "token ids on standard input -> text (nothing added)");
  cmd->add_option("--tokenizer", *path, "a directory with tokenizer.json, or the tokenizer.json itself")->required();
  cmd->add_flag("--skip-special", *skip, "leave out special tokens");
  return [=] {
    auto tok = Tokenizer::load(*path);
    write_stdout(tok->decode(parse_ids(read_stdin(), *tok), *skip));
  };
}

Command add_chat_template(CLI::App& app) {
  auto path = std::make_shared<std::string>();
  auto messages = std::make_shared<std::string>();
  auto gen = std::make_shared<bool>(false);
  auto ids = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand("chat-template", "render a conversation with the tokenizer's chat template");
  cmd->add_option("--tokenizer", *path, "a directory with tokenizer.json + tokenizer_config.json, or the tokenizer.json")
      ->required();
  cmd->add_option("--messages", *messages, "JSON file: [{\"role\": ..., \"content\": ...}, ...] or {\"messages\": [...], ...}")
      ->required();
  cmd->add_flag("--add-generation-prompt", *gen, "end with the assistant's turn opener");
  cmd->add_flag("--ids", *ids, "print the token ids of the rendered prompt as {\"ids\": [...]} instead");
  return [=] {
    auto tok = Tokenizer::load(*path);
    nlohmann::ordered_json doc;
    try {
      doc = nlohmann::ordered_json::parse(read_file(*messages));
    } catch (const nlohmann::json::exception& e) {
      throw Error(cat(*messages, " is not valid JSON: ", e.what()));
    }
    nlohmann::json extra = nlohmann::json::object();
    nlohmann::ordered_json msgs = doc;
    if (doc.is_object()) {
      FATHOM_CHECK(doc.contains("messages"), *messages, " has no \"messages\" field");
      msgs = doc["messages"];
      for (auto it = doc.begin(); it != doc.end(); ++it)
        if (it.key() != "messages") extra[it.key()] = nlohmann::json::parse(it.value().dump());
    }
    FATHOM_CHECK(msgs.is_array(), *messages, ": messages must be a JSON array");
    for (size_t i = 0; i < msgs.size(); ++i) {
      FATHOM_CHECK(msgs[i].is_object(), *messages, ": message ", i, " is not an object");
      FATHOM_CHECK(msgs[i].contains("role") && msgs[i]["role"].is_string(), *messages, ": message ", i,
                   " has no \"role\" string");
    }
    const std::string text = render_chat(*tok, msgs, *gen, extra);
    if (*ids) write_stdout(nlohmann::json{{"ids", tok->encode(text)}}.dump() + "\n");
    else write_stdout(text);
  };
}

}  // namespace fathom::cli
