// The CPU emulation of CUDA blocks shared by the kernel emulators in this folder: 256 std::threads
// per block; __syncthreads, __syncwarp, __shfl_xor_sync and __any_sync as timed barriers that check that every
// thread meets at the same call site (a hang is reported with where the threads wait); a warp's
// exchange space for emulated warp-collective instructions (mma.sync in mma_gemv_emu.cpp).
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <mutex>
#include <thread>
#include <vector>

namespace emu {
constexpr int kThreads = 256;
double g_timeout_s = 20;
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
thread_local Dim3 threadIdx, blockIdx;
thread_local float* emu_sm = nullptr;
const Dim3 blockDim{kThreads, 1, 1};

std::atomic<int> where[kThreads];  // per thread: 0 running, >0 block barrier at line, <-1 warp barrier at -line, -1 exited
std::atomic<bool> g_problem{false};
Dim3 g_block;
const char* g_kernel = "";

void dump_where(const char* why) {
  static std::atomic<bool> once{false};
  if (once.exchange(true)) { std::this_thread::sleep_for(std::chrono::seconds(100)); return; }
  std::fprintf(stderr, "[%s] kernel %s block (%u,%u,%u): %s\n", why, g_kernel, g_block.x, g_block.y, g_block.z, why);
  std::vector<std::pair<int, int>> hist;
  for (int t = 0; t < kThreads; ++t) {
    const int w = where[t].load();
    auto it = std::find_if(hist.begin(), hist.end(), [&](auto& h) { return h.first == w; });
    if (it == hist.end()) hist.push_back({w, 1}); else ++it->second;
  }
  for (auto& [w, c] : hist) {
    if (w == 0) std::fprintf(stderr, "   %3d threads running (not at a barrier)\n", c);
    else if (w == -1) std::fprintf(stderr, "   %3d threads exited\n", c);
    else if (w > 0) std::fprintf(stderr, "   %3d threads at __syncthreads, line %d\n", c, w);
    else std::fprintf(stderr, "   %3d threads at a warp barrier, line %d\n", c, -w);
  }
}

struct Barrier {
  Barrier(int threads, const char* what) : n(threads), name(what) {}
  int n;
  const char* name;
  std::mutex m;
  std::condition_variable cv;
  int count = 0, exited = 0, site = 0;
  uint64_t gen = 0;
  void release() {
    count = 0;
    ++gen;
    cv.notify_all();
  }
  void arrive(int s) {
    std::unique_lock lk(m);
    if (count == 0) site = s;
    else if (site != s) {
      std::fprintf(stderr, "MISMATCH: %s: threads at line %d and line %d in the same barrier generation\n", name, site,
                   s);
      g_problem = true;
    }
    if (++count + exited == n) {
      if (exited) {
        std::fprintf(stderr, "UB: %s released with %d exited threads\n", name, exited);
        g_problem = true;
      }
      release();
      return;
    }
    const uint64_t g = gen;
    if (!cv.wait_for(lk, std::chrono::duration<double>(g_timeout_s), [&] { return gen != g; })) {
      lk.unlock();
      dump_where("HANG (barrier timeout)");
      std::fflush(stderr);
      std::_Exit(3);
    }
  }
  void thread_exit() {
    std::unique_lock lk(m);
    ++exited;
    if (count > 0 && count + exited == n) {
      std::fprintf(stderr, "UB: %s waited on by %d threads while %d exited\n", name, count, exited);
      g_problem = true;
      release();
    }
  }
};

struct BlockState {
  Barrier block{kThreads, "__syncthreads"};
  Barrier warp[kThreads / 32] = {{32, "warp"}, {32, "warp"}, {32, "warp"}, {32, "warp"},
                                 {32, "warp"}, {32, "warp"}, {32, "warp"}, {32, "warp"}};
  float slot[kThreads / 32][32];
  uint32_t xslot[kThreads / 32][32][8];  // emulated warp-collective instructions' operands
};
thread_local BlockState* tl_block = nullptr;

void syncthreads(int line) {
  where[threadIdx.x] = line;
  tl_block->block.arrive(line);
  where[threadIdx.x] = 0;
}
void syncwarp(int line, unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) { std::fprintf(stderr, "partial mask\n"); g_problem = true; }
  where[threadIdx.x] = -line;
  tl_block->warp[threadIdx.x / 32].arrive(line);
  where[threadIdx.x] = 0;
}
float shfl_xor(int line, unsigned mask, float v, int off) {
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  syncwarp(line, mask);  // slot no longer read by a previous shuffle
  tl_block->slot[w][lane] = v;
  syncwarp(line, mask);
  const float r = tl_block->slot[w][lane ^ off];
  return r;
}

bool any_sync(int line, unsigned mask, bool pred) {
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  syncwarp(line, mask);
  tl_block->slot[w][lane] = pred ? 1.f : 0.f;
  syncwarp(line, mask);
  bool any = false;
  for (int l = 0; l < 32; ++l) any = any || tl_block->slot[w][l] != 0.f;
  return any;
}

// Runs fn() on every thread of every block of grid, blocks one after another on one set of
// kThreads workers (made once per call), shared memory (smem_bytes, exactly) filled with NaN
// bytes before each block (reads of unwritten shared memory show).
inline void run_grid(const char* name, Dim3 grid, size_t smem_bytes, const std::function<void()>& fn) {
  g_kernel = name;
  std::vector<float> smem(std::max<size_t>(1, (smem_bytes + sizeof(float) - 1) / sizeof(float)));
  std::mutex m;
  std::condition_variable start_cv, done_cv;
  uint64_t generation = 0;  // block number + 1 being run; workers run each generation once
  bool finished = false;
  int done = 0;
  BlockState* bs = nullptr;
  Dim3 block{};
  std::vector<std::thread> ts;
  ts.reserve(kThreads);
  for (int t = 0; t < kThreads; ++t)
    ts.emplace_back([&, t] {
      uint64_t seen = 0;
      for (;;) {
        {
          std::unique_lock lk(m);
          start_cv.wait(lk, [&] { return finished || generation != seen; });
          if (finished) return;
          seen = generation;
        }
        threadIdx = {unsigned(t), 0, 0};
        blockIdx = block;
        emu_sm = smem.data();
        tl_block = bs;
        fn();
        where[t] = -1;
        bs->block.thread_exit();
        bs->warp[t / 32].thread_exit();
        std::lock_guard lk(m);
        ++done;
        done_cv.notify_all();
      }
    });
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::unique_lock lk(m);
        g_block = block = {x, y, z};
        std::fill(smem.begin(), smem.end(), std::numeric_limits<float>::quiet_NaN());  // uninitialised
        delete bs;
        bs = new BlockState;
        for (auto& w : where) w = 0;
        done = 0;
        ++generation;
        start_cv.notify_all();
        if (!done_cv.wait_for(lk, std::chrono::duration<double>(g_timeout_s * 2), [&] { return done == kThreads; })) {
          lk.unlock();
          dump_where("HANG (block watchdog)");
          std::fflush(stderr);
          std::_Exit(3);
        }
      }
  {
    std::lock_guard lk(m);
    finished = true;
    start_cv.notify_all();
  }
  for (auto& t : ts) t.join();
  delete bs;
}
}  // namespace emu
