#include "tokenizer/bpe.h"

#include <atomic>
#include <cstring>
#include <queue>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/json_fields.h"
#include "tokenizer/unicode.h"

namespace fathom {

size_t StringHash::operator()(std::string_view s) const noexcept {
  // 8 bytes at a time, multiply-xorshift mixing; plenty for short vocabulary strings.
  uint64_t h = 0x243F6A8885A308D3ull ^ (s.size() * 0x9E3779B97F4A7C15ull);
  size_t i = 0;
  for (; i + 8 <= s.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, s.data() + i, 8);
    h = (h ^ w) * 0xFF51AFD7ED558CCDull;
    h ^= h >> 32;
  }
  uint64_t tail = 0;
  std::memcpy(&tail, s.data() + i, s.size() - i);
  h = (h ^ tail) * 0xC4CEB9FE1A85EC53ull;
  h ^= h >> 29;
  return static_cast<size_t>(h);
}

void Bpe::PairTable::init(size_t n) {
  size_t cap = 16;
  while (cap < n * 2) cap <<= 1;
  keys.assign(cap, kEmpty);
  vals.assign(cap, Merge{0, 0});
  mask = cap - 1;
}

void Bpe::PairTable::insert(uint64_t key, Merge m) {
  uint64_t h = (key * 0x9E3779B97F4A7C15ull) >> 20;
  for (uint64_t i = h & mask;; i = (i + 1) & mask) {
    if (keys[i] == key) return;  // a repeated merge keeps its first (lowest) rank, as HF does
    if (keys[i] == kEmpty) {
      keys[i] = key;
      vals[i] = m;
      return;
    }
  }
}

namespace {
std::atomic<uint64_t> g_next_uid{1};

// Per-thread cache of whole pieces -> ids. Most text is made of a few thousand distinct words,
// so after warm-up most pieces skip merging. Keyed by the model's uid so two tokenizers never
// share entries (and a new tokenizer at a freed address never sees stale ones).
struct PieceCache {
  uint64_t uid = 0;
  std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>> map;
};
constexpr size_t kCacheMaxPiece = 64;       // bytes; longer pieces are rare and not cached
constexpr size_t kCacheMaxEntries = 1 << 17;

PieceCache& piece_cache(uint64_t uid) {
  thread_local PieceCache cache;
  if (cache.uid != uid || cache.map.size() >= kCacheMaxEntries) {
    cache.map.clear();
    cache.uid = uid;
  }
  return cache;
}
}  // namespace

void Bpe::load(const nlohmann::json& model, bool byte_level, const std::string& where) {
  uid_ = g_next_uid.fetch_add(1);
  byte_level_ = byte_level;
  const std::string type = model.contains("type") ? json_string(model, "type", where) : "BPE";
  FATHOM_CHECK(type == "BPE", where, ".type is \"", type, "\"; fathom implements the BPE model only");
  byte_fallback_ = json_bool(model, "byte_fallback", where, false);
  ignore_merges_ = json_bool(model, "ignore_merges", where, false);
  fuse_unk_ = json_bool(model, "fuse_unk", where, false);
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    auto it = model.find(k);
    FATHOM_CHECK(it == model.end() || it->is_null() || (it->is_string() && it->get<std::string>().empty()), where,
                 ".", k, " is set; fathom's BPE does not implement it");
  }

  const auto& vocab = json_object(model, "vocab", where);
  int32_t max_id = -1;
  token_to_id_.reserve(vocab.size());
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    FATHOM_CHECK(it.value().is_number_integer(), where, ".vocab[\"", it.key(), "\"] must be an integer id");
    const int64_t id = it.value().get<int64_t>();
    FATHOM_CHECK(id >= 0 && id < (1 << 24), where, ".vocab[\"", it.key(), "\"] = ", id, " is out of range");
    token_to_id_.emplace(it.key(), static_cast<int32_t>(id));
    max_id = std::max(max_id, static_cast<int32_t>(id));
  }
  id_to_token_.assign(static_cast<size_t>(max_id + 1), std::string());
  for (const auto& [tok, id] : token_to_id_) {
    FATHOM_CHECK(id_to_token_[static_cast<size_t>(id)].empty(), where, ".vocab gives id ", id, " to both \"",
                 id_to_token_[static_cast<size_t>(id)], "\" and \"", tok, "\"");
    id_to_token_[static_cast<size_t>(id)] = tok;
  }

  unk_id_ = -1;
  if (model.contains("unk_token") && !model["unk_token"].is_null()) {
    const std::string unk = json_string(model, "unk_token", where);
    auto it = token_to_id_.find(unk);
    FATHOM_CHECK(it != token_to_id_.end(), where, ".unk_token \"", unk, "\" is not in the vocabulary");
    unk_id_ = it->second;
  }

  const auto& unicode_table = unicode::byte_level_table();
  for (int b = 0; b < 256; ++b) {
    byte_id_[b] = -1;
    byte_fallback_id_[b] = -1;
    std::string ch;
    unicode::append_utf8(ch, unicode_table.byte_to_cp[static_cast<size_t>(b)]);
    if (auto it = token_to_id_.find(ch); it != token_to_id_.end()) byte_id_[b] = it->second;
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    if (auto it = token_to_id_.find(std::string_view(name)); it != token_to_id_.end()) byte_fallback_id_[b] = it->second;
  }

  const auto& merges = json_array(model, "merges", where);
  merges_.init(merges.size());
  std::string joined;
  for (size_t r = 0; r < merges.size(); ++r) {
    const auto& m = merges[r];
    std::string_view left, right;
    std::string tmp;
    if (m.is_string()) {  // "left right"
      const auto& s = m.get_ref<const std::string&>();
      size_t sp = s.find(' ');
      FATHOM_CHECK(sp != std::string::npos && sp > 0 && sp + 1 < s.size() && s.find(' ', sp + 1) == std::string::npos,
                   where, ".merges[", r, "] = \"", s, "\" is not two tokens separated by one space");
      left = std::string_view(s).substr(0, sp);
      right = std::string_view(s).substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {  // ["left", "right"]
      left = m[0].get_ref<const std::string&>();
      right = m[1].get_ref<const std::string&>();
    } else {
      throw Error(cat(where, ".merges[", r, "] must be \"a b\" or [\"a\", \"b\"]"));
    }
    auto a = token_to_id_.find(left);
    auto b = token_to_id_.find(right);
    joined.assign(left);
    joined.append(right);
    auto c = token_to_id_.find(joined);
    FATHOM_CHECK(a != token_to_id_.end() && b != token_to_id_.end(), where, ".merges[", r, "]: \"",
                 a == token_to_id_.end() ? left : right, "\" is not in the vocabulary");
    FATHOM_CHECK(c != token_to_id_.end(), where, ".merges[", r, "]: the merged token \"", joined,
                 "\" is not in the vocabulary");
    merges_.insert(pair_key(a->second, b->second), Merge{static_cast<int32_t>(r), c->second});
  }

  if (byte_level_ && ignore_merges_) {
    std::string raw;
    for (const auto& [tok, id] : token_to_id_)
      if (unicode::byte_level_decode(tok, raw)) raw_to_id_.emplace(raw, id);
  }
}

void Bpe::initial_symbols(std::string_view piece, std::vector<int32_t>& syms) const {
  syms.clear();
  auto unknown = [&](std::string_view bytes) {
    if (byte_fallback_) {
      bool all = true;
      for (char ch : bytes) all = all && byte_fallback_id_[static_cast<unsigned char>(ch)] >= 0;
      if (all) {
        for (char ch : bytes) syms.push_back(byte_fallback_id_[static_cast<unsigned char>(ch)]);
        return;
      }
    }
    if (unk_id_ >= 0) {
      if (!(fuse_unk_ && !syms.empty() && syms.back() == unk_id_)) syms.push_back(unk_id_);
    }
    // No unk token: the symbol is dropped, as HF does.
  };
  if (byte_level_) {
    for (char ch : piece) {
      const int32_t id = byte_id_[static_cast<unsigned char>(ch)];
      if (id >= 0) syms.push_back(id);
      else unknown(std::string_view(&ch, 1));
    }
    return;
  }
  size_t i = 0;
  while (i < piece.size()) {
    size_t len = unicode::valid_seq_len(piece, i);
    if (len == 0) len = 1;
    std::string_view ch = piece.substr(i, len);
    auto it = token_to_id_.find(ch);
    if (it != token_to_id_.end()) syms.push_back(it->second);
    else unknown(ch);
    i += len;
  }
}

// Short pieces: rescan for the best pair after each merge (cheaper than a heap below ~50 symbols).
void Bpe::merge_small(std::vector<int32_t>& syms) const {
  while (syms.size() > 1) {
    int32_t best_rank = INT32_MAX, best_id = -1;
    size_t best = 0;
    for (size_t i = 0; i + 1 < syms.size(); ++i) {
      const Merge* m = merges_.find(pair_key(syms[i], syms[i + 1]));
      if (m && m->rank < best_rank) {
        best_rank = m->rank;
        best_id = m->id;
        best = i;
      }
    }
    if (best_id < 0) return;
    syms[best] = best_id;
    syms.erase(syms.begin() + static_cast<std::ptrdiff_t>(best) + 1);
  }
}

// Long pieces: a heap of candidate pairs ordered by (rank, position) over a linked list of symbols;
// stale entries (a side already merged away) are skipped when popped.
void Bpe::merge_heap(std::vector<int32_t>& syms) const {
  const int n = static_cast<int>(syms.size());
  std::vector<int> prev(static_cast<size_t>(n)), next(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    prev[static_cast<size_t>(i)] = i - 1;
    next[static_cast<size_t>(i)] = i + 1 < n ? i + 1 : -1;
  }
  struct Cand {
    int32_t rank;
    int pos;
    int32_t left, right;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int i) {
    if (i < 0) return;
    int j = next[static_cast<size_t>(i)];
    if (j < 0) return;
    const Merge* m = merges_.find(pair_key(syms[static_cast<size_t>(i)], syms[static_cast<size_t>(j)]));
    if (m) heap.push({m->rank, i, syms[static_cast<size_t>(i)], syms[static_cast<size_t>(j)]});
  };
  for (int i = 0; i + 1 < n; ++i) push(i);
  std::vector<char> alive(static_cast<size_t>(n), 1);
  while (!heap.empty()) {
    Cand c = heap.top();
    heap.pop();
    const size_t i = static_cast<size_t>(c.pos);
    if (!alive[i]) continue;
    const int j = next[i];
    if (j < 0 || syms[i] != c.left || syms[static_cast<size_t>(j)] != c.right) continue;
    const Merge* m = merges_.find(pair_key(c.left, c.right));
    syms[i] = m->id;
    alive[static_cast<size_t>(j)] = 0;
    next[i] = next[static_cast<size_t>(j)];
    if (next[i] >= 0) prev[static_cast<size_t>(next[i])] = c.pos;
    push(prev[i]);
    push(c.pos);
  }
  size_t w = 0;
  for (int i = 0; i >= 0 && i < n; i = next[static_cast<size_t>(i)]) syms[w++] = syms[static_cast<size_t>(i)];
  syms.resize(w);
}

void Bpe::encode_piece(std::string_view piece, std::vector<int32_t>& out) const {
  if (piece.empty()) return;
  if (ignore_merges_) {
    const TokenMap& m = byte_level_ ? raw_to_id_ : token_to_id_;
    if (auto it = m.find(piece); it != m.end()) {
      out.push_back(it->second);
      return;
    }
  }
  const bool cacheable = piece.size() <= kCacheMaxPiece;
  PieceCache* cache = nullptr;
  if (cacheable) {
    cache = &piece_cache(uid_);
    if (auto it = cache->map.find(piece); it != cache->map.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  thread_local std::vector<int32_t> syms;
  initial_symbols(piece, syms);
  if (syms.size() < 48) merge_small(syms);
  else merge_heap(syms);
  out.insert(out.end(), syms.begin(), syms.end());
  if (cache) cache->map.emplace(std::string(piece), syms);
}

}  // namespace fathom
