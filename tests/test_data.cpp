// Training data preparation (src/train/data.h, `fathom data prepare`) with the DeepSeek-V3
// tokenizer of ../shared/data: every document comes back from the shards exactly (split at its
// BOS and decoded), the split and the shuffle are deterministic, documents span shards, and bad
// input gets a clear error.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/files.h"
#include "core/sha256.h"
#include "fathom/tokenizer.h"
#include "test_util.h"
#include "tokenizer/chat_template.h"
#include "train/data.h"

using namespace fathom;
using namespace fathom::test;
namespace fs = std::filesystem;

namespace {

const std::string kTokenizer = std::string(FATHOM_SHARED_DATA) + "/deepseek-v3-tokenizer";

const std::unique_ptr<Tokenizer>& tokenizer() {
  static const std::unique_ptr<Tokenizer> tok = Tokenizer::load(kTokenizer);
  return tok;
}

// n documents of different lengths and scripts, written as files doc-<i>.txt
std::vector<std::string> write_docs(const TempDir& tmp, int n, int long_doc = -1) {
  std::vector<std::string> texts;
  fs::create_directories(tmp.file("in"));
  for (int i = 0; i < n; ++i) {
    std::string t = cat("Document ", i, ": the quick brown fox — ünïcödé, 数据 ", i * 7, ".\n");
    for (int r = 0; r < i; ++r) t += cat("def f", r, "(x):\n    return x * ", r, "\n");
    if (i == long_doc)
      for (int r = 0; r < 400; ++r) t += cat("line ", r, " of a long document about tokens and shards.\n");
    write_file_atomic(tmp.file(cat("in/doc-", i, ".txt")), t);
    texts.push_back(t);
  }
  return texts;
}

// the documents of a split, read back from its shards in order and cut at each BOS
std::vector<std::string> read_split(const std::string& dir, const std::string& split) {
  const nlohmann::json m = nlohmann::json::parse(read_file(dir + "/manifest.json"));
  std::vector<int32_t> ids;
  for (const auto& s : m["shards"]) {
    if (s["split"] != split) continue;
    const std::vector<int32_t> part = train::read_shard(dir + "/" + s["file"].get<std::string>());
    EXPECT_EQ(int64_t(part.size()), s["tokens"].get<int64_t>());
    EXPECT_EQ(sha256_hex(read_file(dir + "/" + s["file"].get<std::string>())), s["sha256"].get<std::string>());
    ids.insert(ids.end(), part.begin(), part.end());
  }
  const int32_t bos = *tokenizer()->bos_id();
  std::vector<std::string> docs;
  std::vector<int32_t> cur;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] == bos) {
      if (i > 0) docs.push_back(tokenizer()->decode(cur));
      cur.clear();
      continue;
    }
    EXPECT_TRUE(i > 0) << "a split must start with a document's BOS";
    cur.push_back(ids[i]);
  }
  if (!ids.empty()) docs.push_back(tokenizer()->decode(cur));
  return docs;
}

train::DataPrepareOptions options(const TempDir& tmp, const std::string& out) {
  train::DataPrepareOptions o;
  o.inputs = {tmp.file("in")};
  o.out_dir = tmp.file(out);
  o.val_fraction = 0.25;
  o.shard_tokens = 1024;
  o.progress = false;
  return o;
}

TEST(Data, Sha256KnownAnswers) {  // FIPS 180-4 examples
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  Sha256 h;  // a million 'a', fed in uneven pieces
  const std::string chunk(997, 'a');
  int64_t left = 1000000;
  while (left > 0) {
    const int64_t n = std::min<int64_t>(left, int64_t(chunk.size()));
    h.update(chunk.data(), size_t(n));
    left -= n;
  }
  EXPECT_EQ(h.hex(), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Data, DocumentsComeBackExactlyAcrossShardsAndSplits) {
  TempDir tmp;
  const std::vector<std::string> texts = write_docs(tmp, 8, /*long_doc=*/5);
  const train::DataSummary s = train::prepare_data(*tokenizer(), options(tmp, "out"));
  EXPECT_EQ(s.documents, 8);
  EXPECT_EQ(s.val_documents, 2);  // 25% of 8
  EXPECT_EQ(s.train_documents, 6);
  std::vector<std::string> train = read_split(tmp.file("out"), "train"), val = read_split(tmp.file("out"), "val");
  EXPECT_EQ(train.size(), 6u);
  EXPECT_EQ(val.size(), 2u);
  std::multiset<std::string> got(train.begin(), train.end()), want(texts.begin(), texts.end());
  got.insert(val.begin(), val.end());
  EXPECT_EQ(got, want);  // every document once, byte for byte
  const nlohmann::json m = nlohmann::json::parse(read_file(tmp.file("out/manifest.json")));
  EXPECT_EQ(m["tokens"]["train"].get<int64_t>(), s.train_tokens);
  EXPECT_EQ(m["tokens"]["val"].get<int64_t>(), s.val_tokens);
  EXPECT_EQ(m["tokenizer"]["sha256"].get<std::string>(), sha256_hex(read_file(kTokenizer + "/tokenizer.json")));
  EXPECT_EQ(m["sources"].size(), 8u);
  int64_t train_shards = 0, source_tokens = 0;
  for (const auto& sh : m["shards"]) train_shards += sh["split"] == "train";
  for (const auto& src : m["sources"]) source_tokens += src["tokens"].get<int64_t>();
  EXPECT_GT(train_shards, 1) << "the long document must spill into a second shard";
  EXPECT_EQ(source_tokens, s.train_tokens + s.val_tokens);
}

// Fine-tuning data: each JSON line a conversation, rendered with the tokenizer's chat template
// (which writes BOS and the end-of-turn tokens itself) into one document of exactly the ids of
// that rendering; bad lines are errors naming the file and the line.
TEST(Data, ChatLinesBecomeRenderedConversations) {
  TempDir tmp;
  fs::create_directories(tmp.file("chat"));
  const std::vector<std::string> lines = {
      R"({"messages": [{"role": "user", "content": "What does len() return?"}, {"role": "assistant", "content": "The number of items."}]})",
      R"([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "git add?"}, {"role": "assistant", "content": "Stages changes."}])",
      R"({"messages": [{"role": "user", "content": "数据?"}, {"role": "assistant", "content": "Data."}]})"};
  write_file_atomic(tmp.file("chat/a.jsonl"), lines[0] + "\n\n" + lines[1] + "\n");
  write_file_atomic(tmp.file("chat/b.jsonl"), lines[2]);
  train::DataPrepareOptions o = options(tmp, "out");
  o.inputs = {tmp.file("chat")};
  o.chat = true;
  o.val_fraction = 0;
  const train::DataSummary s = train::prepare_data(*tokenizer(), o);
  EXPECT_EQ(s.documents, 3);
  const ChatTemplate ct = ChatTemplate::parse(tokenizer()->config().chat_template);
  ChatTemplateOptions co;
  co.bos_token = tokenizer()->config().bos_token;
  co.eos_token = tokenizer()->config().eos_token;
  std::multiset<std::vector<int32_t>> want;
  int64_t want_tokens = 0;
  for (const std::string& l : lines) {
    nlohmann::json j = nlohmann::json::parse(l);
    const std::vector<int32_t> ids = tokenizer()->encode(ct.render(j.is_array() ? j : j["messages"], co));
    ASSERT_EQ(ids.front(), *tokenizer()->bos_id()) << "the template starts with BOS";
    want.insert(ids);
    want_tokens += int64_t(ids.size());
  }
  EXPECT_EQ(s.train_tokens, want_tokens);  // no boundary token added beside the template's
  // the stream (context-only bits cleared), cut at each BOS, is the three renderings
  const std::vector<int32_t> raw = train::read_split(tmp.file("out"), "train"), all = train::token_ids(raw);
  std::multiset<std::vector<int32_t>> got;
  for (size_t i = 0; i < all.size();) {
    size_t j = i + 1;
    while (j < all.size() && all[j] != *tokenizer()->bos_id()) ++j;
    got.insert(std::vector<int32_t>(all.begin() + long(i), all.begin() + long(j)));
    i = j;
  }
  EXPECT_EQ(got, want);
  // the tokens to learn (no context-only bit) are exactly the answers, each with its end of turn
  std::multiset<std::string> answers, want_answers;
  std::vector<int32_t> cur;
  for (size_t i = 0; i < raw.size(); ++i) {
    if (!train::is_context_only(raw[i])) cur.push_back(raw[i]);
    if ((train::is_context_only(raw[i]) || i + 1 == raw.size()) && !cur.empty())
      answers.insert(tokenizer()->decode(cur)), cur.clear();
  }
  for (const std::string& l : lines) {
    nlohmann::json j = nlohmann::json::parse(l);
    for (const auto& m : (j.is_array() ? j : j["messages"]))
      if (m["role"] == "assistant") want_answers.insert(m["content"].get<std::string>() + co.eos_token);
  }
  EXPECT_EQ(answers, want_answers);
  EXPECT_TRUE(train::is_context_only(raw[0])) << "the BOS is context";
  // bad lines
  auto fails_with = [&](const std::string& text, const std::string& needle) {
    TempDir t2;
    write_file_atomic(t2.file("c.jsonl"), text);
    train::DataPrepareOptions b = options(t2, "out");
    b.inputs = {t2.file("c.jsonl")};
    b.chat = true;
    try {
      train::prepare_data(*tokenizer(), b);
    } catch (const Error& e) {
      return std::string(e.what()).find(needle) != std::string::npos ? testing::AssertionSuccess()
                                                                      : testing::AssertionFailure() << e.what();
    }
    return testing::AssertionFailure() << "no error";
  };
  EXPECT_TRUE(fails_with(lines[0] + "\n{not json\n", "c.jsonl:2 is not a JSON value"));
  EXPECT_TRUE(fails_with(R"({"messages": []})", "c.jsonl:1 is neither a non-empty array"));
  EXPECT_TRUE(fails_with(R"([{"role": "user", "content": 5}])", "message 0 needs a string"));
}

TEST(Data, TheShuffleAndTheSplitAreDeterministic) {
  TempDir tmp;
  write_docs(tmp, 10);
  train::DataPrepareOptions a = options(tmp, "a"), b = options(tmp, "b"), c = options(tmp, "c");
  c.seed = a.seed + 1;
  train::prepare_data(*tokenizer(), a);
  train::prepare_data(*tokenizer(), b);
  train::prepare_data(*tokenizer(), c);
  EXPECT_EQ(read_file(tmp.file("a/train-00000.bin")), read_file(tmp.file("b/train-00000.bin")));
  EXPECT_EQ(read_file(tmp.file("a/val-00000.bin")), read_file(tmp.file("b/val-00000.bin")));
  EXPECT_NE(read_split(tmp.file("a"), "train"), read_split(tmp.file("c"), "train")) << "another seed, another order";
}

TEST(Data, BadInputIsAClearError) {
  TempDir tmp;
  write_docs(tmp, 3);
  auto expect_error = [&](const train::DataPrepareOptions& o, const std::string& needle) {
    try {
      train::prepare_data(*tokenizer(), o);
      ADD_FAILURE() << "no error; expected one naming " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  train::DataPrepareOptions o = options(tmp, "out");
  o.inputs = {tmp.file("in/missing.txt")};
  expect_error(o, "missing.txt");
  o.inputs = {};
  expect_error(o, "no input files");
  // a binary file among the texts: an error naming it, or skipped and listed when asked
  write_file_atomic(tmp.file("in/zz-binary.txt"), std::string("text\xff\xfe then bytes", 18));
  o = options(tmp, "out");
  expect_error(o, "zz-binary.txt");
  EXPECT_FALSE(fs::exists(tmp.file("out/manifest.json")));
  o.skip_invalid_utf8 = true;
  const train::DataSummary s = train::prepare_data(*tokenizer(), o);
  ASSERT_EQ(s.skipped.size(), 1u);
  EXPECT_NE(s.skipped[0].find("zz-binary.txt"), std::string::npos);
  EXPECT_EQ(s.documents, 3);
  // an existing data set is not overwritten
  expect_error(o, "already holds a data set");
  o = options(tmp, "other");
  o.val_fraction = 1.0;
  expect_error(o, "validation fraction");
  // a truncated shard is rejected on reading
  const std::string shard = tmp.file("out/train-00000.bin");
  const std::string bytes = read_file(shard);
  write_file_atomic(tmp.file("cut.bin"), bytes.substr(0, bytes.size() - 3));
  EXPECT_THROW(train::read_shard(tmp.file("cut.bin")), Error);
  write_file_atomic(tmp.file("junk.bin"), "not a shard at all, just some text");
  EXPECT_THROW(train::read_shard(tmp.file("junk.bin")), Error);
}

TEST(Data, TheCommandLine) {
  TempDir tmp;
  write_docs(tmp, 4);
  CliRun r = run_fathom({"data", "prepare", tmp.file("in"), "--tokenizer", kTokenizer, "-o", tmp.file("out"),
                         "--val-fraction", "0.25", "--quiet"},
                        tmp);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("4 documents"), std::string::npos) << r.out;
  EXPECT_TRUE(fs::exists(tmp.file("out/manifest.json")));
  CliRun bad = run_fathom({"data", "prepare", tmp.file("nothing-here"), "--tokenizer", kTokenizer, "-o",
                           tmp.file("out2"), "--quiet"},
                          tmp);
  EXPECT_TRUE(is_user_error(bad, {"nothing-here", "does not exist"}));
}

}  // namespace
