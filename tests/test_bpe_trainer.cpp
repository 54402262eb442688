// The BPE trainer (src/tokenizer/bpe_trainer.h, `fathom tokenizer train`): its merges against a
// naive reference that recounts every pair before each merge, the written tokenizer loaded back
// (round trips, specials, BOS, the chat template), the pre-tokenizer against DeepSeek-V3's
// published one, determinism over thread counts, and bad input.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/files.h"
#include "fathom/tokenizer.h"
#include "test_util.h"
#include "tokenizer/bpe_trainer.h"
#include "tokenizer/chat_template.h"

namespace fathom {
namespace {

namespace fs = std::filesystem;
using test::TempDir;

// English prose and C++ from the repository itself: every clean checkout has them.
std::string repo_corpus(size_t max_bytes) {
  std::vector<std::string> files;
  for (const char* dir : {"/docs", "/src/tokenizer", "/src/model"})
    for (const auto& e : fs::directory_iterator(std::string(FATHOM_SOURCE_DIR) + dir))
      if (e.is_regular_file()) files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  std::string text;
  for (const auto& f : files) {
    if (text.size() >= max_bytes) break;
    text += read_file(f);
    text += "\n";
  }
  return text;
}

BpeTrainOptions quiet(int32_t vocab, int threads = 1) {
  BpeTrainOptions o;
  o.vocab_size = vocab;
  o.threads = threads;
  o.progress = false;
  return o;
}

// The textbook algorithm: before every merge, count all adjacent pairs of all pieces (times the
// piece's count) and merge the most frequent (ties: the lower pair of ids) everywhere.
std::vector<std::pair<int32_t, int32_t>> naive_merges(const std::unordered_map<std::string, int64_t>& counts,
                                                      int32_t n_merges, int64_t min_frequency) {
  std::vector<std::pair<std::vector<int32_t>, int64_t>> words;
  for (const auto& [piece, n] : counts) {
    std::vector<int32_t> s;
    for (unsigned char b : piece) s.push_back(b);
    words.emplace_back(s, n);
  }
  std::vector<std::pair<int32_t, int32_t>> merges;
  for (int32_t id = 256; int32_t(merges.size()) < n_merges; ++id) {
    std::map<std::pair<int32_t, int32_t>, int64_t> pc;
    for (const auto& [s, n] : words)
      for (size_t i = 0; i + 1 < s.size(); ++i) pc[{s[i], s[i + 1]}] += n;
    std::pair<int32_t, int32_t> best{-1, -1};
    int64_t best_n = 0;
    for (const auto& [p, n] : pc)
      if (n > best_n) best = p, best_n = n;  // map order: the first (lowest) pair wins ties
    if (best_n < min_frequency) break;
    merges.push_back(best);
    for (auto& [s, n] : words) {
      std::vector<int32_t> out;
      for (size_t i = 0; i < s.size(); ++i) {
        if (i + 1 < s.size() && s[i] == best.first && s[i + 1] == best.second) {
          out.push_back(id);
          ++i;
        } else {
          out.push_back(s[i]);
        }
      }
      s = out;
    }
  }
  return merges;
}

TEST(BpeTrainer, MergesEqualTheNaiveAlgorithm) {
  const std::string text = repo_corpus(120000);
  BpeTrainer t(quiet(256 + 7 + 400));
  t.add_text(text, "the corpus");
  const auto counts = t.piece_counts();
  t.train();
  ASSERT_EQ(t.stats().merges, 400);
  const auto want = naive_merges(counts, 400, 2);
  ASSERT_EQ(t.merges().size(), want.size());
  for (size_t i = 0; i < want.size(); ++i)
    ASSERT_EQ(t.merges()[i], want[i]) << "merge " << i << ": " << t.tokens()[size_t(want[i].first)] << " + "
                                      << t.tokens()[size_t(want[i].second)];
  // each token is the concatenation of its merge's parts
  for (size_t i = 0; i < t.merges().size(); ++i) {
    const auto [a, b] = t.merges()[i];
    EXPECT_EQ(t.tokens()[256 + i], t.tokens()[size_t(a)] + t.tokens()[size_t(b)]);
  }
}

TEST(BpeTrainer, StopsWhenNoPairIsFrequentEnough) {
  // pieces "ab" x5 and "abc" x3 (lines apart): (a,b) 8 -> "ab", then (ab,c) 3 -> "abc", then nothing
  std::string text;
  for (int i = 0; i < 5; ++i) text += "ab\n";
  for (int i = 0; i < 3; ++i) text += "abc\n";
  BpeTrainOptions o = quiet(1000);
  o.min_frequency = 3;
  BpeTrainer t(o);
  t.add_text(text, "text");
  t.train();
  EXPECT_TRUE(t.stats().stopped_early);
  ASSERT_EQ(t.merges().size(), 2u);
  EXPECT_EQ(t.tokens()[256], "ab");
  EXPECT_EQ(t.tokens()[257], "abc");
  EXPECT_EQ(t.stats().vocab_size, 258 + 7);
}

TEST(BpeTrainer, WritesATokenizerThatRoundTrips) {
  TempDir dir;
  const std::string text = repo_corpus(400000);
  BpeTrainer t(quiet(3000, 2));
  t.add_text(text, "the corpus");
  t.train();
  t.save(dir.path());
  const auto tok = Tokenizer::load(dir.path());
  EXPECT_EQ(tok->vocab_size(), 3000);
  // the learnt text compresses, and frequent words are one token each
  const std::vector<int32_t> ids = tok->encode(text);
  EXPECT_LT(double(ids.size()) / double(text.size()), 0.4) << ids.size() << " tokens for " << text.size() << " bytes";
  EXPECT_EQ(tok->encode(" the").size(), 1u);
  EXPECT_EQ(tok->decode(ids), text);
  for (const std::string s : {"", "x", "Hello, world! 12345 6789", "漢字とかなカナ交じり文 读书", "emoji 🙂👍🏽 e\u0301 \xc3\xa9",
                              "tabs\tand\r\nCRLF\n\n  spaces   ", "fn main() { let x = 0x1F; }"}) {
    EXPECT_EQ(tok->decode(tok->encode(s)), s) << s;
  }
  // the special tokens: single ids after the learnt vocabulary, in order; <think> is kept by
  // decoding, BOS is not
  const auto specials = BpeTrainOptions::default_specials();
  for (size_t i = 0; i < specials.size(); ++i) {
    const std::vector<int32_t> one = tok->encode(specials[i].content);
    ASSERT_EQ(one.size(), 1u) << specials[i].content;
    EXPECT_EQ(one[0], 3000 - int32_t(specials.size()) + int32_t(i));
    EXPECT_EQ(tok->is_special(one[0]), specials[i].special) << specials[i].content;
  }
  ASSERT_TRUE(tok->bos_id().has_value());
  const std::vector<int32_t> with_bos = tok->encode("Hi", true);
  ASSERT_FALSE(with_bos.empty());
  EXPECT_EQ(with_bos[0], *tok->bos_id());
  EXPECT_EQ(tok->decode(tok->encode("a<think>b</think>c")), "a<think>b</think>c");
  // the chat template renders DeepSeek-V3's format
  const ChatTemplate ct = ChatTemplate::parse(tok->config().chat_template);
  ChatTemplateOptions co;
  co.bos_token = tok->config().bos_token;
  co.eos_token = tok->config().eos_token;
  co.add_generation_prompt = true;
  const auto messages = nlohmann::json::parse(R"([{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"},
      {"role":"assistant","content":"Hello","reasoning_content":"greet"},{"role":"user","content":"Bye"}])");
  EXPECT_EQ(ct.render(messages, co),
            "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜><think>greet</think>Hello<｜end▁of▁sentence｜>"
            "<｜User｜>Bye<｜Assistant｜>");
}

TEST(BpeTrainer, UsesDeepSeekV3sPreTokenizer) {
  BpeTrainer t(quiet(300));
  t.add_text("some text", "text");
  t.train();
  const nlohmann::json mine = nlohmann::json::parse(t.tokenizer_json());
  const nlohmann::json ds =
      nlohmann::json::parse(read_file(std::string(FATHOM_SHARED_DATA) + "/deepseek-v3-tokenizer/tokenizer.json"));
  EXPECT_EQ(mine["pre_tokenizer"], ds["pre_tokenizer"]);
}

TEST(BpeTrainer, TheSameTokenizerWhateverTheThreads) {
  // more than one 1 MiB chunk, so the parallel count really splits the text
  std::string text;
  const std::string base = repo_corpus(300000);
  while (text.size() < (size_t(5) << 20) / 2) text += base;
  std::string first;
  for (int threads : {1, 3}) {
    BpeTrainer t(quiet(1500, threads));
    t.add_text(text, "text");
    t.train();
    if (first.empty())
      first = t.tokenizer_json();
    else
      EXPECT_TRUE(first == t.tokenizer_json()) << threads << " threads gave another tokenizer";
  }
}

TEST(BpeTrainer, SpecialTokenTextIsNotLearnt) {
  std::string text;
  for (int i = 0; i < 50; ++i) text += "<｜User｜>hello<｜Assistant｜>world\n";
  BpeTrainer t(quiet(400));
  t.add_text(text, "text");
  for (const auto& [piece, n] : t.piece_counts()) EXPECT_EQ(piece.find("User"), std::string::npos) << piece;
}

TEST(BpeTrainer, BadInputIsAClearError) {
  TempDir dir;
  auto throws_with = [](auto&& f, const std::string& needle) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what()).find(needle) != std::string::npos ? testing::AssertionSuccess()
                                                                      : testing::AssertionFailure() << e.what();
    }
    return testing::AssertionFailure() << "no error";
  };
  EXPECT_TRUE(throws_with([] { BpeTrainer t(quiet(263)); }, "vocab_size 263"));
  BpeTrainOptions dup = quiet(1000);
  dup.specials.push_back({"<think>", false});
  EXPECT_TRUE(throws_with([&] { BpeTrainer t(dup); }, "listed twice"));
  BpeTrainOptions role = quiet(1000);
  role.bos_token = "<s>";
  EXPECT_TRUE(throws_with([&] { BpeTrainer t(role); }, "<s>"));
  BpeTrainer t(quiet(1000));
  EXPECT_TRUE(throws_with([&] { t.add_files({dir.file("missing.txt")}); }, "missing.txt"));
  write_file_atomic(dir.file("bad.txt"), std::string("good text \xff\xfe then bad"));
  EXPECT_TRUE(throws_with([&] { t.add_files({dir.file("bad.txt")}); }, "bad.txt is not valid UTF-8 (byte 10)"));
  fs::create_directories(dir.file("empty"));
  EXPECT_TRUE(throws_with([&] { t.add_files({dir.file("empty")}); }, "holds no files"));
  EXPECT_TRUE(throws_with([&] { t.train(); }, "no text"));
}

TEST(BpeTrainer, Cli) {
  TempDir dir;
  write_file_atomic(dir.file("a.txt"), repo_corpus(50000));
  fs::create_directories(dir.file("more"));
  write_file_atomic(dir.file("more/b.txt"), "Another file, another day.\n");
  test::CliRun r = test::run_fathom(
      {"tokenizer", "train", dir.file("a.txt"), dir.file("more"), "-o", dir.file("tok"), "--vocab-size", "700", "-q"}, dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("vocabulary 700"), std::string::npos) << r.out;
  EXPECT_EQ(Tokenizer::load(dir.file("tok"))->vocab_size(), 700);
  EXPECT_TRUE(test::is_user_error(test::run_fathom({"tokenizer", "train", dir.file("nope.txt"), "-o", dir.file("t2")}, dir),
                                  {"nope.txt", "does not exist"}));
  EXPECT_TRUE(test::is_user_error(
      test::run_fathom({"tokenizer", "train", dir.file("a.txt"), "-o", dir.file("t3"), "--vocab-size", "100"}, dir),
      {"vocab-size"}));
  EXPECT_TRUE(test::is_user_error(
      test::run_fathom({"tokenizer", "train", dir.file("a.txt"), "-o", dir.file("t4"), "--special", "<s>"}, dir),
      {"--special"}));
}

}  // namespace
}  // namespace fathom
