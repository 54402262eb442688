// Tokenizer tests: exact ids against HF `tokenizers` on the DeepSeek-V3 tokenizer, round trips,
// the streaming detokenizer, the other pre-tokenizer / decoder types on small hand-made
// tokenizers, and bad input.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <random>

#include "core/error.h"
#include "core/files.h"
#include "fathom/tokenizer.h"
#include "test_util.h"

namespace fathom {
namespace {

const std::string kV3Dir = std::string(FATHOM_SHARED_DATA) + "/deepseek-v3-tokenizer";

const Tokenizer& v3() {
  static std::unique_ptr<Tokenizer> tok = Tokenizer::load(kV3Dir);
  return *tok;
}

std::vector<int32_t> ids_of(const nlohmann::json& a) {
  std::vector<int32_t> v;
  for (const auto& x : a) v.push_back(x.get<int32_t>());
  return v;
}

TEST(Tokenizer, ReferenceIdsExact) {
  auto cases = nlohmann::json::parse(read_file(test::fixture_dir("tokenizer-reference.json")));
  ASSERT_GE(cases.size(), 20u);
  for (const auto& c : cases) {
    const std::string text = c["text"];
    EXPECT_EQ(v3().encode(text), ids_of(c["ids"])) << "text: " << text;
    EXPECT_EQ(v3().decode(ids_of(c["ids"])), c["decoded"].get<std::string>()) << "text: " << text;
    EXPECT_EQ(v3().decode(v3().encode(text)), text);
  }
}

TEST(Tokenizer, ReferenceChatIdsExact) {
  auto cases = nlohmann::json::parse(read_file(test::fixture_dir("tokenizer-reference-chat.json")));
  ASSERT_GE(cases.size(), 1u);
  for (const auto& c : cases) {
    // HF apply_chat_template tokenizes the rendered text without adding special tokens.
    EXPECT_EQ(v3().encode(c["text"].get<std::string>()), ids_of(c["ids"]));
  }
}

TEST(Tokenizer, AddSpecialPrependsBos) {
  auto ids = v3().encode("Hello", true);
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids[0], 0);
  EXPECT_EQ(v3().bos_id(), 0);
  EXPECT_EQ(v3().eos_id(), 1);
  EXPECT_EQ(v3().vocab_size(), 128815);
  EXPECT_TRUE(v3().is_special(0));
  EXPECT_FALSE(v3().is_special(19923));
  EXPECT_EQ(v3().decode({0, 19923}, /*skip_special=*/true), "Hello");
}

// Random strings mixing ASCII, whitespace, digits, punctuation, accents, CJK, emoji and the
// special tokens: decode(encode(s)) == s, and batch encoding gives the same ids.
std::string random_text(std::mt19937& rng, int n) {
  static const std::vector<std::string> atoms = {
      "a", "Z", "the", " ", "  ", "\n", "\r\n", "\t", "\v", "\f", "0", "7", "123", "4567", ".", ",", "!", "?",
      "'s", "(", "}", "<", ">", "_", "-", "é", "e\xCC\x81", "ß", "ñ", "深", "度", "求索", "ひら", "カタ", "한국",
      "Я", "ب", "\xF0\x9F\x98\x80", "\xE2\x80\x8D", "\xE2\x80\x94", "\xC2\xA0", "\xE3\x80\x80", "\xEF\xBF\xBD",
      "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<｜end▁of▁sentence｜>", "\\", "\"", "$", "^"};
  std::string s;
  std::uniform_int_distribution<size_t> pick(0, atoms.size() - 1);
  std::uniform_int_distribution<uint32_t> cp(0x20, 0x2FFFF);
  for (int i = 0; i < n; ++i) {
    if (rng() % 8 == 0) {  // an arbitrary code point (not a surrogate)
      uint32_t c = cp(rng);
      if (c >= 0xD800 && c <= 0xDFFF) c = 0x41;
      std::string u;
      if (c < 0x80) u.push_back(char(c));
      else if (c < 0x800) u = {char(0xC0 | (c >> 6)), char(0x80 | (c & 0x3F))};
      else if (c < 0x10000) u = {char(0xE0 | (c >> 12)), char(0x80 | ((c >> 6) & 0x3F)), char(0x80 | (c & 0x3F))};
      else u = {char(0xF0 | (c >> 18)), char(0x80 | ((c >> 12) & 0x3F)), char(0x80 | ((c >> 6) & 0x3F)), char(0x80 | (c & 0x3F))};
      s += u;
    } else {
      s += atoms[pick(rng)];
    }
  }
  return s;
}

TEST(Tokenizer, RandomUnicodeRoundTrip) {
  std::mt19937 rng(std::random_device{}());
  std::vector<std::string> texts;
  for (int t = 0; t < 300; ++t) {
    std::string s = random_text(rng, 1 + int(rng() % 60));
    ASSERT_EQ(utf8_invalid_offset(s), std::string::npos);
    auto ids = v3().encode(s);
    for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < v3().vocab_size());
    ASSERT_EQ(v3().decode(ids), s) << "text: " << s;
    texts.push_back(s);
  }
  auto batch = v3().encode_batch(texts);
  for (size_t i = 0; i < texts.size(); ++i) EXPECT_EQ(batch[i], v3().encode(texts[i]));
}

TEST(Tokenizer, StreamDecoderNeverSplitsCharacters) {
  std::mt19937 rng(std::random_device{}());
  for (int t = 0; t < 100; ++t) {
    std::string s = random_text(rng, 40);
    auto ids = v3().encode(s);
    StreamDecoder sd(v3());
    std::string streamed;
    for (int32_t id : ids) {
      std::string piece = sd.push(id);
      ASSERT_EQ(utf8_invalid_offset(piece), std::string::npos) << "piece splits a character";
      streamed += piece;
    }
    streamed += sd.flush();
    EXPECT_EQ(streamed, s);
  }
}

TEST(Tokenizer, StreamDecoderReplacesInvalidBytes) {
  // Byte-level tokens for 0xF0 0x9F (the start of an emoji) followed by 'A': the emoji never
  // completes, so the two bytes become one U+FFFD, exactly as a whole decode does.
  auto f0 = v3().token_to_id("ð");  // byte 0xF0 in the byte-level alphabet
  auto x9f = v3().token_to_id("Ł");  // byte 0x9F
  auto a = v3().token_to_id("A");
  ASSERT_TRUE(f0 && x9f && a);
  StreamDecoder sd(v3());
  std::string out = sd.push(*f0);
  EXPECT_EQ(out, "");
  out += sd.push(*x9f);
  EXPECT_EQ(out, "");
  out += sd.push(*a);
  EXPECT_EQ(out, "\xEF\xBF\xBD" "A");
  EXPECT_EQ(v3().decode({*f0, *x9f, *a}), out);
  // A dangling lead byte at the end is flushed as U+FFFD.
  EXPECT_EQ(sd.push(*f0), "");
  EXPECT_EQ(sd.flush(), "\xEF\xBF\xBD");
}

TEST(Tokenizer, Utf8Helpers) {
  EXPECT_EQ(utf8_invalid_offset("abc"), std::string::npos);
  EXPECT_EQ(utf8_invalid_offset("ab\xFF"), 2u);
  EXPECT_EQ(utf8_invalid_offset("\xC0\x80"), 0u);        // overlong
  EXPECT_EQ(utf8_invalid_offset("x\xED\xA0\x80"), 1u);   // surrogate
  EXPECT_EQ(utf8_invalid_offset("\xF4\x90\x80\x80"), 0u);  // > U+10FFFF
  EXPECT_EQ(utf8_sanitize("a\xFF" "b"), "a\xEF\xBF\xBD" "b");
  EXPECT_EQ(utf8_sanitize("\xE2\x82" "A"), "\xEF\xBF\xBD" "A");  // truncated 3-byte: one U+FFFD
  EXPECT_EQ(utf8_sanitize("\xF0\x9F\x98"), "\xEF\xBF\xBD");
  EXPECT_EQ(utf8_sanitize("\xC0\xAF"), "\xEF\xBF\xBD\xEF\xBF\xBD");  // C0 never starts a sequence
}

TEST(Tokenizer, InvalidUtf8InputIsAnError) {
  try {
    v3().encode("hello \xC3(");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not valid UTF-8 at byte 6"), std::string::npos) << e.what();
  }
}

// ---- small hand-made tokenizers for the other components

// A byte-level BPE over letters with merges "a b" -> "ab", "ab c" -> "abc".
nlohmann::json tiny_byte_level() {
  nlohmann::json vocab = nlohmann::json::object();
  int id = 0;
  for (const char* t : {"a", "b", "c", "d", "Ġ", "1", "2", "3", "ab", "abc", "Ġa", "12", "!", "<", ">", "x", "y"}) vocab[t] = id++;
  return {{"version", "1.0"},
          {"normalizer", nullptr},
          {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
          {"decoder", {{"type", "ByteLevel"}}},
          {"post_processor", nullptr},
          {"added_tokens", nlohmann::json::array()},
          {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", {"a b", "ab c", "Ġ a", "1 2"}}}}};
}

std::unique_ptr<Tokenizer> make(const nlohmann::json& j) { return Tokenizer::from_json(j.dump(), "", "test.json"); }

std::vector<std::string> tokens(const Tokenizer& t, const std::string& s) {
  std::vector<std::string> out;
  for (int32_t id : t.encode(s)) out.push_back(t.id_to_token(id));
  return out;
}

TEST(Tokenizer, BpeMergesByRank) {
  auto t = make(tiny_byte_level());
  EXPECT_EQ(tokens(*t, "abc"), (std::vector<std::string>{"abc"}));
  EXPECT_EQ(tokens(*t, "abcd a"), (std::vector<std::string>{"abc", "d", "Ġa"}));
  // GPT-2 regex splits digits from letters; "123" is one piece: 12 + 3.
  EXPECT_EQ(tokens(*t, "ab123"), (std::vector<std::string>{"ab", "12", "3"}));
  // Long pieces take the heap path: same result as merging by hand.
  std::string longs;
  for (int i = 0; i < 40; ++i) longs += "abc";
  auto ids = t->encode(longs);
  EXPECT_EQ(ids.size(), 40u);
  EXPECT_EQ(t->decode(ids), longs);
}

TEST(Tokenizer, MergesInArrayForm) {
  auto j = tiny_byte_level();
  j["model"]["merges"] = nlohmann::json::parse(R"([["a", "b"], ["ab", "c"]])");
  auto t = make(j);
  EXPECT_EQ(tokens(*t, "abc"), (std::vector<std::string>{"abc"}));
}

TEST(Tokenizer, IgnoreMergesTakesWholeWords) {
  auto j = tiny_byte_level();
  j["model"]["merges"] = {"a b"};  // "abc" cannot be built by merges...
  j["model"]["ignore_merges"] = true;  // ...but is in the vocabulary, so it is taken whole
  auto t = make(j);
  EXPECT_EQ(tokens(*t, "abc"), (std::vector<std::string>{"abc"}));
  j["model"]["ignore_merges"] = false;
  EXPECT_EQ(tokens(*make(j), "abc"), (std::vector<std::string>{"ab", "c"}));
}

TEST(Tokenizer, SplitBehaviours) {
  auto j = tiny_byte_level();
  auto with = [&](const std::string& behavior, bool invert) {
    auto k = j;
    k["pre_tokenizer"] = {{"type", "Sequence"},
                          {"pretokenizers",
                           {{{"type", "Split"}, {"pattern", {{"String", "x"}}}, {"behavior", behavior}, {"invert", invert}},
                            {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
    k["model"]["merges"] = nlohmann::json::array();
    // Make every 2-letter combination of x and a/b visible: give "ax", "xa", "xx" ids.
    k["model"]["vocab"]["ax"] = 100;
    k["model"]["vocab"]["xa"] = 101;
    k["model"]["vocab"]["xx"] = 102;
    k["model"]["merges"] = {"a x", "x a", "x x"};
    return make(k);
  };
  // "axxa": matches at 1 and 2.
  EXPECT_EQ(tokens(*with("Removed", false), "axxa"), (std::vector<std::string>{"a", "a"}));
  EXPECT_EQ(tokens(*with("Isolated", false), "axxa"), (std::vector<std::string>{"a", "x", "x", "a"}));
  EXPECT_EQ(tokens(*with("MergedWithPrevious", false), "axxa"), (std::vector<std::string>{"ax", "x", "a"}));
  EXPECT_EQ(tokens(*with("MergedWithNext", false), "axxa"), (std::vector<std::string>{"a", "x", "xa"}));
  EXPECT_EQ(tokens(*with("Contiguous", false), "axxa"), (std::vector<std::string>{"a", "xx", "a"}));
  // invert: the non-x stretches are the "matches", so Removed drops them (each x stays its own piece).
  EXPECT_EQ(tokens(*with("Removed", true), "axxa"), (std::vector<std::string>{"x", "x"}));
  EXPECT_EQ(tokens(*with("Contiguous", true), "axxa"), (std::vector<std::string>{"a", "xx", "a"}));
}

TEST(Tokenizer, DigitsPreTokenizer) {
  auto j = tiny_byte_level();
  for (bool individual : {false, true}) {
    j["pre_tokenizer"] = {{"type", "Sequence"},
                          {"pretokenizers",
                           {{{"type", "Digits"}, {"individual_digits", individual}},
                            {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
    auto t = make(j);
    EXPECT_EQ(tokens(*t, "a12"), individual ? (std::vector<std::string>{"a", "1", "2"})
                                             : (std::vector<std::string>{"a", "12"}));
  }
}

TEST(Tokenizer, ByteLevelAddPrefixSpace) {
  auto j = tiny_byte_level();
  j["pre_tokenizer"]["add_prefix_space"] = true;
  EXPECT_EQ(tokens(*make(j), "a"), (std::vector<std::string>{"Ġa"}));
}

TEST(Tokenizer, AddedTokenFlags) {
  auto j = tiny_byte_level();
  j["added_tokens"] = {
      {{"id", 200}, {"content", "<s>"}, {"special", true}, {"lstrip", false}, {"rstrip", false}, {"single_word", false}, {"normalized", false}},
      {{"id", 201}, {"content", "<ls>"}, {"special", false}, {"lstrip", true}, {"rstrip", false}, {"single_word", false}, {"normalized", false}},
      {{"id", 202}, {"content", "<rs>"}, {"special", false}, {"lstrip", false}, {"rstrip", true}, {"single_word", false}, {"normalized", false}},
      {{"id", 203}, {"content", "ab"}, {"special", false}, {"lstrip", false}, {"rstrip", false}, {"single_word", true}, {"normalized", false}},
      {{"id", 204}, {"content", "<s>x"}, {"special", false}, {"lstrip", false}, {"rstrip", false}, {"single_word", false}, {"normalized", false}},
  };
  auto t = make(j);
  EXPECT_EQ(t->encode("a<s>b"), (std::vector<int32_t>{0, 200, 1}));
  EXPECT_EQ(t->encode("<s>xa"), (std::vector<int32_t>{204, 0}));      // longest match wins
  EXPECT_EQ(t->encode("a  <ls>b"), (std::vector<int32_t>{0, 201, 1}));  // lstrip eats the spaces
  EXPECT_EQ(t->encode("a<rs>  b"), (std::vector<int32_t>{0, 202, 1}));  // rstrip eats the spaces
  EXPECT_EQ(t->encode("ab"), (std::vector<int32_t>{203}));            // a whole word
  EXPECT_EQ(t->encode("abc"), (std::vector<int32_t>{9}));             // inside a word: BPE's "abc"
  EXPECT_EQ(t->vocab_size(), 205);
  EXPECT_EQ(t->decode({0, 200, 1}, true), "ab");
}

TEST(Tokenizer, ByteFallbackAndMetaspaceDecoders) {
  // A sentencepiece-style vocabulary: ▁ for spaces, <0xXX> byte tokens for unknown characters.
  nlohmann::json vocab = {{"<unk>", 0}, {"▁", 1}, {"h", 2}, {"i", 3}, {"▁hi", 4}, {"▁h", 5}, {"hi", 6}};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab[name] = 10 + b;
  }
  nlohmann::json j;
  j["normalizer"] = nlohmann::json::parse(R"({"type": "Sequence", "normalizers": [
      {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]})");
  j["pre_tokenizer"] = nullptr;
  j["decoder"] = nlohmann::json::parse(R"({"type": "Sequence", "decoders": [
      {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
      {"type": "Strip", "content": " ", "start": 1, "stop": 0}]})");
  j["model"] = nlohmann::json::parse(R"({"type": "BPE", "merges": ["▁ h", "▁h i", "h i"], "byte_fallback": true, "unk_token": "<unk>"})");
  j["model"]["vocab"] = vocab;
  auto t = make(j);
  auto ids = t->encode("hi hié");
  // ▁hi ▁hi then é as two byte tokens (0xC3 0xA9).
  EXPECT_EQ(ids, (std::vector<int32_t>{4, 4, 10 + 0xC3, 10 + 0xA9}));
  EXPECT_EQ(t->decode(ids), "hi hié");
}

TEST(Tokenizer, PostProcessorTemplate) {
  auto j = tiny_byte_level();
  j["post_processor"] = nlohmann::json::parse(R"({"type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "<", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": ">", "type_id": 0}}],
      "special_tokens": {"<": {"id": "<", "ids": [13], "tokens": ["<"]}, ">": {"id": ">", "ids": [14], "tokens": [">"]}}})");
  auto t = make(j);
  EXPECT_EQ(t->encode("a", true), (std::vector<int32_t>{13, 0, 14}));
  EXPECT_EQ(t->encode("a", false), (std::vector<int32_t>{0}));
}

// ---- bad input: every case a fathom::Error that names the problem

void expect_error(const std::string& json_text, const std::string& needle) {
  try {
    Tokenizer::from_json(json_text, "", "bad/tokenizer.json");
    FAIL() << "no error for " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Tokenizer, BadTokenizerJson) {
  const std::string full = read_file(kV3Dir + "/tokenizer.json");
  expect_error(full.substr(0, full.size() / 2), "is not valid JSON");  // truncated
  expect_error("", "is not valid JSON");
  expect_error("[1,2]", "must hold a JSON object");
  auto j = tiny_byte_level();
  auto k = j;
  k["pre_tokenizer"]["type"] = "Frobnicate";
  expect_error(k.dump(), "unknown pre-tokenizer type \"Frobnicate\"");
  k = j;
  k["normalizer"] = {{"type", "NFKC"}};
  expect_error(k.dump(), "unknown normalizer type \"NFKC\"");
  k = j;
  k["decoder"] = {{"type", "WordPiece"}};
  expect_error(k.dump(), "unknown decoder type \"WordPiece\"");
  k = j;  // a decoder type that is not a string, inside a Sequence (found by fuzz_tokenizer_json)
  k["decoder"] = nlohmann::json::parse(R"({"type": "Sequence", "decoders": [{"type": 0}]})");
  expect_error(k.dump(), "decoder.decoders[0]");
  k = j;
  k["model"]["type"] = "Unigram";
  expect_error(k.dump(), "BPE model only");
  k = j;
  k["model"].erase("vocab");
  expect_error(k.dump(), "has no field \"vocab\"");
  k = j;
  k["model"]["merges"] = {"a zz"};
  expect_error(k.dump(), "merges[0]: \"zz\" is not in the vocabulary");
  k = j;
  k["model"]["merges"] = {"abc"};
  expect_error(k.dump(), "is not two tokens");
  k = j;
  k["model"]["vocab"]["q"] = "seven";
  expect_error(k.dump(), "must be an integer id");
  k = j;
  k["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}};
  expect_error(k.dump(), "does not compile");
  k = j;
  k["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "a"}}}, {"behavior", "Sideways"}};
  expect_error(k.dump(), "unknown split behaviour \"Sideways\"");
  k = j;
  k["added_tokens"] = {{{"id", -3}, {"content", "<x>"}}};
  expect_error(k.dump(), "added_tokens[0].id");
  k = j;
  k["model"]["vocab"]["far"] = (1 << 24) - 1;  // one id near 2^24: not 16M empty slots
  expect_error(k.dump(), "more than 2^20 ids would be unassigned");
  k = j;
  k["post_processor"] = nlohmann::json::parse(R"({"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>"}},
      {"Sequence": {"id": "A"}}], "special_tokens": {"<s>": {"id": "<s>", "ids": [99999], "tokens": ["<s>"]}}})");
  expect_error(k.dump(), "the post-processor adds id 99999");
  k = j;
  k["post_processor"] = {{"type", "Mystery"}};
  expect_error(k.dump(), "unknown post-processor type \"Mystery\"");
}

TEST(Tokenizer, BadPaths) {
  EXPECT_THROW(Tokenizer::load("/nonexistent/tokenizer"), Error);
  test::TempDir dir;
  try {
    Tokenizer::load(dir.path());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("has no tokenizer.json"), std::string::npos);
  }
  EXPECT_THROW(v3().id_to_token(-1), Error);
  EXPECT_THROW(v3().decode({v3().vocab_size()}), Error);
}

}  // namespace
}  // namespace fathom
