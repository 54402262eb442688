// The text commands end to end through the `fathom` binary: tokenize / detokenize /
// chat-template against the HF references, generate --prompt and chat on a random-weight
// model with the full DeepSeek-V3 vocabulary, and their bad input.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/files.h"
#include "test_util.h"

namespace fathom {
namespace {

using test::CliRun;
using test::is_user_error;
using test::run_fathom;
using test::TempDir;
namespace fs = std::filesystem;

const std::string kTok = std::string(FATHOM_SHARED_DATA) + "/deepseek-v3-tokenizer";

std::string ids_text(const nlohmann::json& ids) {
  std::string s;
  for (const auto& v : ids) {
    if (!s.empty()) s.push_back(' ');
    s += std::to_string(v.get<int>());
  }
  return s;
}

TEST(TextCli, TokenizeAndDetokenizeMatchReference) {
  TempDir tmp;
  auto cases = nlohmann::json::parse(read_file(test::fixture_dir("tokenizer-reference.json")));
  for (size_t i = 0; i < cases.size(); i += 4) {  // a sample; test_tokenizer checks them all in-process
    const std::string text = cases[i]["text"];
    if (text.empty()) continue;
    CliRun r = run_fathom({"tokenize", "--tokenizer", kTok, "--json"}, tmp, text);
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_EQ(nlohmann::json::parse(r.out)["ids"], cases[i]["ids"]) << text;
    r = run_fathom({"tokenize", "--tokenizer", kTok + "/tokenizer.json"}, tmp, text);
    EXPECT_EQ(r.out, ids_text(cases[i]["ids"]) + "\n");
    r = run_fathom({"detokenize", "--tokenizer", kTok}, tmp, ids_text(cases[i]["ids"]));
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_EQ(r.out, cases[i]["decoded"].get<std::string>());
  }
  CliRun r = run_fathom({"tokenize", "--tokenizer", kTok, "--json", "--add-special"}, tmp, "Hello");
  EXPECT_EQ(r.out, "{\"ids\":[0,19923]}\n");
  r = run_fathom({"detokenize", "--tokenizer", kTok, "--skip-special"}, tmp, "{\"ids\": [0, 19923]}");
  EXPECT_EQ(r.out, "Hello");
}

TEST(TextCli, ChatTemplateMatchesReference) {
  TempDir tmp;
  auto cases = nlohmann::json::parse(read_file(test::fixture_dir("tokenizer-reference-chat.json")));
  for (const auto& c : cases) {
    const std::string msgs = tmp.file("messages.json");
    std::ofstream(msgs) << c["messages"].dump();
    CliRun r = run_fathom({"chat-template", "--tokenizer", kTok, "--messages", msgs, "--add-generation-prompt"}, tmp);
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_EQ(r.out, c["text"].get<std::string>());  // exactly, no newline added
    r = run_fathom({"chat-template", "--tokenizer", kTok, "--messages", msgs, "--add-generation-prompt", "--ids"}, tmp);
    EXPECT_EQ(nlohmann::json::parse(r.out)["ids"], c["ids"]);
  }
}

// A small random-weight V3 model with the full 129,280-id vocabulary and the DeepSeek tokenizer.
class TextModel : public testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    nlohmann::json c = nlohmann::json::parse(read_file(std::string(FATHOM_SOURCE_DIR) + "/bench/configs/v3-chat-random.json"));
    c["hidden_size"] = 64;
    c["num_hidden_layers"] = 2;
    c["num_attention_heads"] = 4;
    c["num_key_value_heads"] = 4;
    c["q_lora_rank"] = 32;
    c["kv_lora_rank"] = 32;
    c["intermediate_size"] = 128;
    c["moe_intermediate_size"] = 32;
    c["n_routed_experts"] = 8;
    c["num_experts_per_tok"] = 2;
    std::ofstream(dir_->file("config.json")) << c.dump();
    CliRun r = run_fathom({"init-random", "--config", dir_->file("config.json"), "--out", dir_->file("model"),
                           "--tokenizer", kTok, "--seed", "7", "--std", "0.2"},
                          *dir_);
    ASSERT_EQ(r.status, 0) << r.err;
    model_ = dir_->file("model");
  }
  static void TearDownTestSuite() { delete dir_; }
  static TempDir* dir_;
  static std::string model_;
  TempDir tmp_;
};
TempDir* TextModel::dir_ = nullptr;
std::string TextModel::model_;

TEST_F(TextModel, GreedyPromptMatchesTokenIdPath) {
  const std::string prompt = "The capital of France is";
  CliRun r = run_fathom({"generate", "--model", model_, "--prompt", prompt, "--max-tokens", "8", "--ignore-eos"}, tmp_);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.err.find("tokens/s"), std::string::npos);
  // Same prompt through the token-id path (BOS added as --prompt does), then detokenized.
  CliRun t = run_fathom({"tokenize", "--tokenizer", model_, "--json", "--add-special"}, tmp_, prompt);
  auto ids = nlohmann::json::parse(t.out)["ids"].get<std::vector<int64_t>>();
  // input_ids as a safetensors file, written by hand: header + I64 data.
  nlohmann::json header = {{"input_ids", {{"dtype", "I64"}, {"shape", {1, ids.size()}}, {"data_offsets", {0, ids.size() * 8}}}}};
  std::string h = header.dump();
  std::string file;
  uint64_t n = h.size();
  file.append(reinterpret_cast<const char*>(&n), 8).append(h).append(reinterpret_cast<const char*>(ids.data()), ids.size() * 8);
  std::ofstream(tmp_.file("ids.safetensors"), std::ios::binary) << file;
  CliRun g = run_fathom({"generate", "--model", model_, "--input-ids", tmp_.file("ids.safetensors"), "--max-new-tokens", "8",
                         "--out", tmp_.file("gen.json")},
                        tmp_);
  ASSERT_EQ(g.status, 0) << g.err;
  auto gen = nlohmann::json::parse(read_file(tmp_.file("gen.json")))["ids"];
  CliRun d = run_fathom({"detokenize", "--tokenizer", model_, "--skip-special"}, tmp_, gen.dump());
  EXPECT_EQ(r.out, d.out);
}

TEST_F(TextModel, TokenizerFromElsewhere) {
  // The same weights in a directory without tokenizer files: --tokenizer supplies them.
  const std::string bare = tmp_.file("bare");
  fs::create_directories(bare);
  for (const char* f : {"config.json", "model.safetensors"}) fs::create_symlink(fs::path(model_) / f, fs::path(bare) / f);
  CliRun a = run_fathom({"generate", "--model", model_, "--prompt", "Hi", "--max-tokens", "6", "--ignore-eos"}, tmp_);
  CliRun b = run_fathom({"generate", "--model", bare, "--tokenizer", kTok, "--prompt", "Hi", "--max-tokens", "6", "--ignore-eos"},
                        tmp_);
  ASSERT_EQ(b.status, 0) << b.err;
  EXPECT_EQ(a.out, b.out);
}

TEST_F(TextModel, SeedDecidesSampledOutput) {
  auto run = [&](const std::string& seed) {
    CliRun r = run_fathom({"generate", "--model", model_, "--prompt", "Once upon a time", "--max-tokens", "12",
                           "--temperature", "1.0", "--top-p", "0.9", "--top-k", "50", "--seed", seed, "--ignore-eos"},
                          tmp_);
    EXPECT_EQ(r.status, 0) << r.err;
    return r.out;
  };
  const std::string a = run("11"), b = run("11"), c = run("12");
  EXPECT_FALSE(a.empty());
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
}

// A model directory's generation_config.json (HF's file) sets the sampling defaults the command
// line leaves open; options given on the command line win; a malformed file is a user error.
TEST_F(TextModel, GenerationConfigSetsTheDefaults) {
  const std::string dir = tmp_.file("with-config");
  fs::create_directories(dir);
  for (const auto& e : fs::directory_iterator(model_)) fs::create_symlink(e.path(), fs::path(dir) / e.path().filename());
  std::ofstream(fs::path(dir) / "generation_config.json")
      << R"({"do_sample": true, "temperature": 1.3, "top_p": 0.8, "top_k": 40, "repetition_penalty": 1.2})";
  auto gen = [&](const std::string& model, std::vector<std::string> extra) {
    std::vector<std::string> args = {"generate", "--model", model, "--prompt", "Once upon a time", "--max-tokens", "12",
                                     "--seed", "5", "--ignore-eos"};
    args.insert(args.end(), extra.begin(), extra.end());
    CliRun r = run_fathom(args, tmp_);
    EXPECT_EQ(r.status, 0) << r.err;
    return r.out;
  };
  const std::string from_file = gen(dir, {});
  const std::string spelled_out = gen(model_, {"--temperature", "1.3", "--top-p", "0.8", "--top-k", "40",
                                               "--repetition-penalty", "1.2"});
  EXPECT_FALSE(from_file.empty());
  EXPECT_EQ(from_file, spelled_out);
  // the command line wins: greedy stays greedy, with the file's repetition penalty
  EXPECT_EQ(gen(dir, {"--temperature", "0"}), gen(model_, {"--temperature", "0", "--repetition-penalty", "1.2"}));
  EXPECT_NE(gen(dir, {"--temperature", "0"}), from_file);
  // do_sample false: the penalty still applies, the sampling keys do not (generate stays greedy)
  std::ofstream(fs::path(dir) / "generation_config.json") << R"({"do_sample": false, "temperature": 1.3, "repetition_penalty": 1.2})";
  EXPECT_EQ(gen(dir, {}), gen(model_, {"--temperature", "0", "--repetition-penalty", "1.2"}));
  for (const char* bad : {R"({"temperature": )", R"({"do_sample": "yes"})", R"({"do_sample": true, "top_p": "high"})",
                          R"({"do_sample": true, "top_k": -3})", R"([1, 2])", R"({"do_sample": true, "temperature": -1})"}) {
    std::ofstream(fs::path(dir) / "generation_config.json") << bad;
    CliRun r = run_fathom({"generate", "--model", dir, "--prompt", "x", "--max-tokens", "2"}, tmp_);
    EXPECT_TRUE(is_user_error(r, {std::string(bad).find("-1") != std::string::npos ? "temperature" : "generation_config.json"}))
        << bad << ": " << r.err;
    r = run_fathom({"chat", "--model", dir}, tmp_, "hi\n");
    EXPECT_NE(r.status, 0) << bad;
  }
}

TEST_F(TextModel, StopStringEndsTheOutput) {
  CliRun full = run_fathom({"generate", "--model", model_, "--prompt", "Hello", "--max-tokens", "16", "--ignore-eos"}, tmp_);
  ASSERT_EQ(full.status, 0) << full.err;
  ASSERT_GE(full.out.size(), 6u);
  // Cut at a stop string taken from the middle of the greedy output (at a character boundary).
  size_t at = full.out.size() / 2;
  while (at > 0 && (static_cast<unsigned char>(full.out[at]) & 0xC0) == 0x80) --at;
  size_t len = 1;
  while (at + len < full.out.size() && (static_cast<unsigned char>(full.out[at + len]) & 0xC0) == 0x80) ++len;
  const std::string stop = full.out.substr(at, len);
  CliRun r = run_fathom({"generate", "--model", model_, "--prompt", "Hello", "--max-tokens", "16", "--ignore-eos",
                         "--stop", stop},
                        tmp_);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, full.out.substr(0, full.out.find(stop)));
  EXPECT_NE(r.err.find("finish: stop"), std::string::npos) << r.err;
}

TEST_F(TextModel, ChatSessionFromAPipe) {
  const std::string script = "/help\nHello there\n/system Be brief.\nline one \\\nline two\n\"\"\"\nblock one\nblock two\n\"\"\"\n"
                             "/reset\n/bogus\n\xff\xfe\nWhat?\n";
  CliRun r = run_fathom({"chat", "--model", model_, "--max-tokens", "6", "--seed", "3"}, tmp_, script);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("/system TEXT"), std::string::npos);
  EXPECT_NE(r.out.find("(system prompt set; conversation cleared)"), std::string::npos);
  EXPECT_NE(r.out.find("(conversation cleared)"), std::string::npos);
  EXPECT_NE(r.out.find("unknown command /bogus"), std::string::npos);
  EXPECT_NE(r.out.find("not valid UTF-8 at byte 0"), std::string::npos);
  // Four questions answered, each with its speed.
  size_t answers = 0;
  for (size_t p = r.out.find("tokens/s"); p != std::string::npos; p = r.out.find("tokens/s", p + 1)) ++answers;
  EXPECT_EQ(answers, 4u) << r.out;
  EXPECT_EQ(r.out.find("\x1b["), std::string::npos) << "no terminal colours when stdout is not a terminal";
}

TEST_F(TextModel, ChatKeepsThePrefixCached) {
  CliRun r = run_fathom({"chat", "--model", model_, "--max-tokens", "4", "--seed", "3"}, tmp_, "First question\nSecond one\n");
  ASSERT_EQ(r.status, 0) << r.err;
  const size_t second = r.out.find("cached)", r.out.find("cached)") + 1);
  ASSERT_NE(second, std::string::npos) << r.out;
  // The second turn reuses the first turn's tokens: "(N cached)" with N > 0.
  const size_t open = r.out.rfind('(', second);
  EXPECT_GT(std::stoi(r.out.substr(open + 1)), 0) << r.out;
}

// ---- bad input

TEST(TextCli, BadInput) {
  TempDir tmp;
  CliRun r = run_fathom({"tokenize", "--tokenizer", kTok}, tmp, "ok \xC3\x28 then");
  EXPECT_TRUE(is_user_error(r, {"not valid UTF-8 at byte 3"}));
  r = run_fathom({"tokenize", "--tokenizer", tmp.file("missing")}, tmp, "x");
  EXPECT_TRUE(is_user_error(r, {"missing", "does not exist"}));
  // Truncated and malformed tokenizer.json files.
  const std::string full = read_file(kTok + "/tokenizer.json");
  fs::create_directories(tmp.file("trunc"));
  std::ofstream(tmp.file("trunc/tokenizer.json")) << full.substr(0, full.size() - 1000);
  r = run_fathom({"tokenize", "--tokenizer", tmp.file("trunc")}, tmp, "x");
  EXPECT_TRUE(is_user_error(r, {"tokenizer.json", "not valid JSON"}));
  auto j = nlohmann::json::parse(full);
  j["pre_tokenizer"]["pretokenizers"][1]["type"] = "Mystery";
  fs::create_directories(tmp.file("unknown"));
  std::ofstream(tmp.file("unknown/tokenizer.json")) << j.dump();
  r = run_fathom({"tokenize", "--tokenizer", tmp.file("unknown")}, tmp, "x");
  EXPECT_TRUE(is_user_error(r, {"pretokenizers[1]", "unknown pre-tokenizer type \"Mystery\""}));

  r = run_fathom({"detokenize", "--tokenizer", kTok}, tmp, "12 abc");
  EXPECT_TRUE(is_user_error(r, {"\"abc\"", "not a token id"}));
  r = run_fathom({"detokenize", "--tokenizer", kTok}, tmp, "12 999999");
  EXPECT_TRUE(is_user_error(r, {"999999", "outside the vocabulary"}));
  r = run_fathom({"detokenize", "--tokenizer", kTok}, tmp, "[1, \"x\"]");
  EXPECT_TRUE(is_user_error(r, {"id 1", "not an integer"}));

  // A template with an unsupported construct: the error names it and its line.
  fs::create_directories(tmp.file("tmpl"));
  fs::copy_file(kTok + "/tokenizer.json", tmp.file("tmpl/tokenizer.json"));
  std::ofstream(tmp.file("tmpl/tokenizer_config.json"))
      << nlohmann::json{{"chat_template", "{{ bos_token }}\n{% macro m() %}x{% endmacro %}"}}.dump();
  std::ofstream(tmp.file("m.json")) << R"([{"role": "user", "content": "hi"}])";
  r = run_fathom({"chat-template", "--tokenizer", tmp.file("tmpl"), "--messages", tmp.file("m.json")}, tmp);
  EXPECT_TRUE(is_user_error(r, {"macro", "line 2"}));
  std::ofstream(tmp.file("bad.json")) << R"([{"role": "user", "content": )";
  r = run_fathom({"chat-template", "--tokenizer", kTok, "--messages", tmp.file("bad.json")}, tmp);
  EXPECT_TRUE(is_user_error(r, {"bad.json", "not valid JSON"}));
  std::ofstream(tmp.file("norole.json")) << R"([{"content": "hi"}])";
  r = run_fathom({"chat-template", "--tokenizer", kTok, "--messages", tmp.file("norole.json")}, tmp);
  EXPECT_TRUE(is_user_error(r, {"message 0", "role"}));
}

TEST_F(TextModel, GenerateBadInput) {
  CliRun r = run_fathom({"generate", "--model", model_, "--prompt", "x", "--temperature", "-1"}, tmp_);
  EXPECT_TRUE(is_user_error(r, {"temperature"}));
  r = run_fathom({"generate", "--model", model_, "--prompt", "x", "--top-p", "0"}, tmp_);
  EXPECT_TRUE(is_user_error(r, {"top_p"}));
  r = run_fathom({"generate", "--model", model_, "--prompt", "x", "--max-tokens", "0"}, tmp_);
  EXPECT_TRUE(is_user_error(r, {"max_tokens"}));
  r = run_fathom({"generate", "--model", model_, "--prompt", "x", "--stop", ""}, tmp_);
  EXPECT_TRUE(is_user_error(r, {"stop"}));
  r = run_fathom({"generate", "--model", model_, "--prompt", "bad \xFF"}, tmp_);
  EXPECT_TRUE(is_user_error(r, {"--prompt", "UTF-8"}));
  r = run_fathom({"generate", "--model", model_}, tmp_);
  EXPECT_TRUE(is_user_error(r, {"--prompt"}));
  // A model without a tokenizer, and a tokenizer larger than the model's vocabulary.
  r = run_fathom({"generate", "--model", test::fixture_dir("v3-tiny"), "--prompt", "x"}, tmp_);
  EXPECT_TRUE(is_user_error(r, {"no tokenizer.json", "--tokenizer"}));
  r = run_fathom({"generate", "--model", test::fixture_dir("v3-tiny"), "--prompt", "x", "--tokenizer", kTok}, tmp_);
  EXPECT_TRUE(is_user_error(r, {"vocabulary"}));
  r = run_fathom({"chat", "--model", test::fixture_dir("v3-tiny"), "--tokenizer", kTok}, tmp_, "hi\n");
  EXPECT_TRUE(is_user_error(r, {"vocabulary"}));
}

}  // namespace
}  // namespace fathom
