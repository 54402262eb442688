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
  h ^= tail;
  // murmur3's finalizer: every input bit reaches every output bit.
  h ^= h >> 33;
  h *= 0xFF51AFD7ED558CCDull;
  h ^= h >> 33;
  h *= 0xC4CEB9FE1A85EC53ull;
  h ^= h >> 33;
  return static_cast<size_t>(h);
}

int32_t TokenIndex::build(const std::vector<std::string>& strings) {
  strings_ = &strings;
  size_t cap = 16;
  while (cap < strings.size() * 2) cap <<= 1;
  slots_.assign(cap, Slot{});
  mask_ = cap - 1;
  StringHash hasher;
  for (size_t id = 0; id < strings.size(); ++id) {
    const std::string& s = strings[id];
    if (s.empty()) continue;
    const uint64_t h = hasher(s);
    for (uint64_t i = h & mask_;; i = (i + 1) & mask_) {
      Slot& slot = slots_[i];
      if (slot.id < 0) {
        slot = Slot{h, static_cast<int32_t>(id), static_cast<uint32_t>(s.size())};
        break;
      }
      if (slot.hash == h && strings[static_cast<size_t>(slot.id)] == s) return static_cast<int32_t>(id);
    }
  }
  return -1;
}

int32_t TokenIndex::find(std::string_view s) const {
  if (slots_.empty()) return -1;
  const uint64_t h = StringHash{}(s);
  for (uint64_t i = h & mask_;; i = (i + 1) & mask_) {
    const Slot& slot = slots_[i];
    if (slot.id < 0) return -1;
    if (slot.hash == h && slot.len == s.size() && (*strings_)[static_cast<size_t>(slot.id)] == s) return slot.id;
  }
}

void TokenIndex::find_batch(const std::string_view* keys, size_t n, int32_t* ids) const {
  constexpr size_t kBatch = 64;
  uint64_t h[kBatch];
  for (size_t b0 = 0; b0 < n; b0 += kBatch) {
    const size_t m = std::min(kBatch, n - b0);
    for (size_t k = 0; k < m; ++k) {
      h[k] = StringHash{}(keys[b0 + k]);
      __builtin_prefetch(&slots_[h[k] & mask_]);
    }
    // First probe of each key: prefetch the string object it points at.
    for (size_t k = 0; k < m; ++k) {
      const Slot& slot = slots_[h[k] & mask_];
      if (slot.id >= 0) __builtin_prefetch(&(*strings_)[static_cast<size_t>(slot.id)]);
    }
    for (size_t k = 0; k < m; ++k) {
      const std::string_view s = keys[b0 + k];
      int32_t found = -1;
      for (uint64_t i = h[k] & mask_;; i = (i + 1) & mask_) {
        const Slot& slot = slots_[i];
        if (slot.id < 0) break;
        if (slot.hash == h[k] && slot.len == s.size() && (*strings_)[static_cast<size_t>(slot.id)] == s) {
          found = slot.id;
          break;
        }
      }
      ids[b0 + k] = found;
    }
  }
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
// share entries (and a new tokenizer at a freed address never sees stale ones). A flat
// open-addressing table over two arenas (piece bytes, ids); emptied when it fills up.
class PieceCache {
 public:
  static constexpr size_t kMaxPiece = 64;  // bytes; longer pieces are rare and not cached

  const int32_t* find(uint64_t h, std::string_view piece, uint32_t* n_ids) const {
    for (size_t i = h & kMask;; i = (i + 1) & kMask) {
      const Entry& e = table_[i];
      if (e.key_len == 0) return nullptr;
      if (e.hash == h && e.key_len == piece.size() && std::memcmp(bytes_.data() + e.key_off, piece.data(), piece.size()) == 0) {
        *n_ids = e.n_ids;
        return ids_.data() + e.ids_off;
      }
    }
  }
  void insert(uint64_t h, std::string_view piece, const std::vector<int32_t>& ids) {
    if (count_ * 2 >= kSlots || ids.size() > 0xFFFF) {
      if (ids.size() > 0xFFFF) return;
      clear();
    }
    size_t i = h & kMask;
    while (table_[i].key_len != 0) i = (i + 1) & kMask;
    table_[i] = Entry{h, static_cast<uint32_t>(bytes_.size()), static_cast<uint32_t>(ids_.size()),
                      static_cast<uint16_t>(piece.size()), static_cast<uint16_t>(ids.size())};
    bytes_.append(piece);
    ids_.insert(ids_.end(), ids.begin(), ids.end());
    ++count_;
  }
  void reset_for(uint64_t uid) {
    if (uid_ != uid) {
      clear();
      uid_ = uid;
    }
  }

 private:
  static constexpr size_t kSlots = 1 << 17, kMask = kSlots - 1;
  struct Entry {
    uint64_t hash = 0;
    uint32_t key_off = 0, ids_off = 0;
    uint16_t key_len = 0, n_ids = 0;  // key_len 0 = empty slot (empty pieces are never cached)
  };
  void clear() {
    table_.assign(kSlots, Entry{});
    bytes_.clear();
    ids_.clear();
    count_ = 0;
  }
  std::vector<Entry> table_ = std::vector<Entry>(kSlots);
  std::string bytes_;
  std::vector<int32_t> ids_;
  size_t count_ = 0;
  uint64_t uid_ = 0;
};

PieceCache& piece_cache(uint64_t uid) {
  thread_local PieceCache cache;
  cache.reset_for(uid);
  return cache;
}
}  // namespace

void Bpe::load(const nlohmann::json& model, std::vector<std::pair<std::string, int64_t>> vocab,
               const std::vector<std::pair<std::string, std::string>>& merges, bool byte_level, const std::string& where) {
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

  int64_t max_id = -1;
  for (const auto& [tok, id] : vocab) {
    FATHOM_CHECK(id >= 0 && id < (1 << 24), where, ".vocab[\"", tok, "\"] = ", id, " is out of range");
    max_id = std::max(max_id, id);
  }
  // Ids may leave holes (added tokens fill some), but not millions of them: a tiny file must
  // not make us allocate gigabytes.
  FATHOM_CHECK(max_id < static_cast<int64_t>(vocab.size()) + (1 << 20), where, ".vocab has ", vocab.size(),
               " entries but ids up to ", max_id, "; more than 2^20 ids would be unassigned");
  id_to_token_.assign(static_cast<size_t>(max_id + 1), std::string());
  for (auto& [tok, id] : vocab) {
    FATHOM_CHECK(!tok.empty(), where, ".vocab has an empty token (id ", id, ")");
    FATHOM_CHECK(id_to_token_[static_cast<size_t>(id)].empty(), where, ".vocab gives id ", id, " to both \"",
                 id_to_token_[static_cast<size_t>(id)], "\" and \"", tok, "\"");
    id_to_token_[static_cast<size_t>(id)] = std::move(tok);
  }
  const int32_t dup = token_to_id_.build(id_to_token_);
  FATHOM_CHECK(dup < 0, where, ".vocab lists \"", dup < 0 ? std::string() : id_to_token_[static_cast<size_t>(dup)],
               "\" twice");

  unk_id_ = -1;
  if (model.contains("unk_token") && !model["unk_token"].is_null()) {
    const std::string unk = json_string(model, "unk_token", where);
    unk_id_ = token_to_id_.find(unk);
    FATHOM_CHECK(unk_id_ >= 0, where, ".unk_token \"", unk, "\" is not in the vocabulary");
  }

  const auto& unicode_table = unicode::byte_level_table();
  for (int b = 0; b < 256; ++b) {
    byte_id_[b] = -1;
    byte_fallback_id_[b] = -1;
    std::string ch;
    unicode::append_utf8(ch, unicode_table.byte_to_cp[static_cast<size_t>(b)]);
    byte_id_[b] = token_to_id_.find(ch);
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    byte_fallback_id_[b] = token_to_id_.find(std::string_view(name));
  }

  // Resolve the merges in batches: ids of left, right and left+right for each.
  merges_.init(merges.size());
  constexpr size_t kBatch = 256;
  std::vector<std::string> joined(kBatch);
  std::vector<std::string_view> keys(3 * kBatch);
  std::vector<int32_t> ids(3 * kBatch);
  for (size_t r0 = 0; r0 < merges.size(); r0 += kBatch) {
    const size_t m = std::min(kBatch, merges.size() - r0);
    for (size_t k = 0; k < m; ++k) {
      const auto& [left, right] = merges[r0 + k];
      joined[k].assign(left);
      joined[k].append(right);
      keys[3 * k] = left;
      keys[3 * k + 1] = right;
      keys[3 * k + 2] = joined[k];
    }
    token_to_id_.find_batch(keys.data(), 3 * m, ids.data());
    for (size_t k = 0; k < m; ++k) {
      const size_t r = r0 + k;
      const int32_t a = ids[3 * k], b = ids[3 * k + 1], c = ids[3 * k + 2];
      FATHOM_CHECK(a >= 0 && b >= 0, where, ".merges[", r, "]: \"", a < 0 ? merges[r].first : merges[r].second,
                   "\" is not in the vocabulary");
      FATHOM_CHECK(c >= 0, where, ".merges[", r, "]: the merged token \"", joined[k], "\" is not in the vocabulary");
      merges_.insert(pair_key(a, b), Merge{static_cast<int32_t>(r), c});
    }
  }

  if (byte_level_ && ignore_merges_) {
    raw_tokens_.assign(id_to_token_.size(), std::string());
    for (size_t id = 0; id < id_to_token_.size(); ++id)
      if (!unicode::byte_level_decode(id_to_token_[id], raw_tokens_[id])) raw_tokens_[id].clear();
    raw_to_id_.build(raw_tokens_);
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
    const int32_t id = token_to_id_.find(ch);
    if (id >= 0) syms.push_back(id);
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
    const int32_t id = (byte_level_ ? raw_to_id_ : token_to_id_).find(piece);
    if (id >= 0) {
      out.push_back(id);
      return;
    }
  }
  PieceCache* cache = nullptr;
  uint64_t h = 0;
  if (piece.size() <= PieceCache::kMaxPiece) {
    cache = &piece_cache(uid_);
    h = StringHash{}(piece);
    uint32_t n = 0;
    if (const int32_t* ids = cache->find(h, piece, &n)) {
      out.insert(out.end(), ids, ids + n);
      return;
    }
  }
  thread_local std::vector<int32_t> syms;
  initial_symbols(piece, syms);
  if (syms.size() < 48) merge_small(syms);
  else merge_heap(syms);
  out.insert(out.end(), syms.begin(), syms.end());
  if (cache) cache->insert(h, piece, syms);
}

}  // namespace fathom
