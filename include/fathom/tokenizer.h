// fathom's public tokenizer API: a HuggingFace `tokenizer.json` (byte-level BPE as DeepSeek
// V2/V3/R1 publish it, and other BPE tokenizers) loaded and run exactly as HF `tokenizers`
// does; plus the streaming detokenizer that turns ids back into text as they arrive.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace fathom {

class ThreadPool;

// What tokenizer_config.json says around the vocabulary (all optional there).
struct TokenizerConfig {
  std::string bos_token;      // e.g. "<｜begin▁of▁sentence｜>"; empty when none
  std::string eos_token;
  std::string pad_token;
  bool add_bos_token = false;  // what "add special tokens" means when tokenizer.json has no template
  bool add_eos_token = false;
  std::string chat_template;   // Jinja source; empty when the directory has none
};

struct AddedTokenInfo {
  int32_t id = 0;
  std::string content;
  bool special = false;
  bool lstrip = false, rstrip = false, single_word = false, normalized = false;
};

class Tokenizer {
 public:
  ~Tokenizer();
  // `path`: a directory holding tokenizer.json (and optionally tokenizer_config.json) or the
  // path of a tokenizer.json. Throws fathom::Error naming the file and the field when anything
  // is missing, malformed or of a type fathom does not implement.
  static std::unique_ptr<Tokenizer> load(const std::string& path);
  // The same from text already in memory (`what` names it in errors); `config_json` may be empty.
  static std::unique_ptr<Tokenizer> from_json(std::string_view tokenizer_json, std::string_view config_json,
                                              const std::string& what);

  // Text → ids. `text` must be valid UTF-8 (otherwise fathom::Error naming the byte offset).
  // Added/special tokens written in the text are always recognised; `add_special` adds what
  // the post-processor (or tokenizer_config's add_bos_token/add_eos_token) adds, e.g. BOS.
  std::vector<int32_t> encode(std::string_view text, bool add_special = false) const;
  // Many texts at once, spread over `pool` (the global pool when null); same ids as encode().
  std::vector<std::vector<int32_t>> encode_batch(const std::vector<std::string>& texts, bool add_special = false,
                                                 ThreadPool* pool = nullptr) const;

  // Ids → text; byte sequences that are not valid UTF-8 become U+FFFD. Throws on ids outside
  // the vocabulary.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = false) const;
  // The raw bytes a single token stands for after the decoder (may be part of a UTF-8
  // character); `first` says whether it starts the text (decoders such as Metaspace strip
  // a leading space there).
  std::string token_bytes(int32_t id, bool first = false) const;

  int32_t vocab_size() const;  // one past the largest id (model vocab + added tokens)
  std::optional<int32_t> token_to_id(std::string_view token) const;  // vocabulary string or added token
  std::string id_to_token(int32_t id) const;                          // as written in tokenizer.json
  bool is_special(int32_t id) const;
  const std::vector<AddedTokenInfo>& added_tokens() const;
  const TokenizerConfig& config() const;
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  const std::string& source() const;  // the file it was loaded from

  struct Impl;

 private:
  Tokenizer() = default;
  std::unique_ptr<Impl> impl_;
};

// Streaming detokenizer: push ids as the model produces them, get back the text that is now
// complete. Never splits a UTF-8 character across two pieces; bytes that cannot become valid
// UTF-8 are emitted as U+FFFD. flush() emits what is still held (a truncated character → U+FFFD).
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special = false);
  std::string push(int32_t id);
  std::string flush();
  void reset();

 private:
  const Tokenizer& tok_;
  bool skip_special_;
  bool first_ = true;
  std::string pending_;  // bytes of an incomplete UTF-8 character
};

// UTF-8 helpers used across the tokenizer, the chat template and the engine.
// Index of the first byte that does not start a valid UTF-8 sequence, or npos when valid.
size_t utf8_invalid_offset(std::string_view s);
// `s` with every invalid byte sequence replaced by U+FFFD (as Rust's from_utf8_lossy does).
std::string utf8_sanitize(std::string_view s);

}  // namespace fathom
