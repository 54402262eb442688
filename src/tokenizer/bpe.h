// Byte-pair encoding: a piece starts as single symbols (bytes for byte-level BPE, characters
// otherwise) and the adjacent pair with the lowest merge rank is merged, again and again,
// until no pair of the piece is in the merge list. The vocabulary gives each final symbol its
// id. This is the `model` of tokenizer.json with type "BPE".
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace fathom {

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const noexcept;
};
using TokenMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

// string -> id over a vector of strings indexed by id, as a flat open-addressing table of
// (hash, id): one probe and one compare per lookup, nothing allocated per entry.
class TokenIndex {
 public:
  // Indexes every non-empty strings[id]; returns the id of a string listed twice, or -1.
  int32_t build(const std::vector<std::string>& strings);
  int32_t find(std::string_view s) const;  // -1 when absent
  // Many lookups at once (ids[i] = find(keys[i])), with the table's cache lines prefetched for
  // the whole batch first: loading a 128K vocabulary is otherwise one cache miss per lookup.
  void find_batch(const std::string_view* keys, size_t n, int32_t* ids) const;
  bool empty() const { return slots_.empty(); }

 private:
  struct Slot {
    uint64_t hash = 0;
    int32_t id = -1;  // -1 = empty
    uint32_t len = 0;
  };
  const std::vector<std::string>* strings_ = nullptr;
  std::vector<Slot> slots_;
  uint64_t mask_ = 0;
};

class Bpe {
 public:
  // `model`: the tokenizer.json "model" object; `byte_level`: whether the pre-tokenizer is
  // ByteLevel (then the vocabulary is written in the byte-level alphabet and pieces are raw
  // bytes). Throws fathom::Error naming `where` and the bad entry.
  // `vocab` and `merges` are model.vocab and model.merges, read apart from the rest of
  // `model` (see tokenizer_json.h).
  void load(const nlohmann::json& model, std::vector<std::pair<std::string, int64_t>> vocab,
            const std::vector<std::pair<std::string, std::string>>& merges, bool byte_level, const std::string& where);

  // Appends the ids of one pre-tokenized piece (raw bytes, valid UTF-8 as a whole text).
  void encode_piece(std::string_view piece, std::vector<int32_t>& out) const;

  const std::vector<std::string>& id_to_token() const { return id_to_token_; }
  int32_t find_token(std::string_view token) const { return token_to_id_.find(token); }
  bool byte_fallback() const { return byte_fallback_; }
  int32_t vocab_end() const { return static_cast<int32_t>(id_to_token_.size()); }

 private:
  struct Merge {
    int32_t rank;
    int32_t id;
  };
  // Open-addressing table (left id, right id) -> merge, the inner loop's only lookup.
  struct PairTable {
    std::vector<uint64_t> keys;
    std::vector<Merge> vals;
    uint64_t mask = 0;
    void init(size_t n);
    void insert(uint64_t key, Merge m);
    const Merge* find(uint64_t key) const {
      uint64_t h = (key * 0x9E3779B97F4A7C15ull) >> 20;
      for (uint64_t i = h & mask;; i = (i + 1) & mask) {
        if (keys[i] == key) return &vals[i];
        if (keys[i] == kEmpty) return nullptr;
      }
    }
    static constexpr uint64_t kEmpty = ~0ull;
  };
  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  void initial_symbols(std::string_view piece, std::vector<int32_t>& syms) const;
  void merge_small(std::vector<int32_t>& syms) const;
  void merge_heap(std::vector<int32_t>& syms) const;

  std::vector<std::string> id_to_token_;  // as written in tokenizer.json (empty for holes)
  TokenIndex token_to_id_;
  std::vector<std::string> raw_tokens_;  // byte-level only, with ignore_merges: each token's raw bytes
  TokenIndex raw_to_id_;
  PairTable merges_;
  int32_t byte_id_[256];  // byte-level: the id of each single byte
  int32_t byte_fallback_id_[256];  // "<0xAB>" tokens when byte_fallback
  bool byte_level_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  bool fuse_unk_ = false;
  int32_t unk_id_ = -1;
  uint64_t uid_ = 0;  // identifies this model in the per-thread piece cache
};

}  // namespace fathom
