// A timeline of one stretch of GPU work, from CUPTI's activity records (the library nsys itself
// reads, here loaded with dlopen so that the benchmarks start without it): every kernel, copy and
// memset with its device start and end, and every CUDA runtime call with its host start and end.
// From them, for the stretch between begin() and end():
//   - how much of the wall time the GPU was busy (the union of the device intervals),
//   - the kernels by total time (name, launches, µs),
//   - the runtime calls by total host time (cudaLaunchKernel, cudaMemcpyAsync, cudaMallocAsync, ...),
// so that a step bound by the host (the GPU waiting between launches) shows as such, and where
// the host's time goes. bench_train --timeline prints it for the measured steps.
#pragma once
#include <cupti.h>
#include <cxxabi.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace fathom::bench {

class CuptiTimeline {
 public:
  // Loads CUPTI and starts recording; false (with a message) where the library is missing.
  bool begin() {
    lib_ = dlopen("libcupti.so", RTLD_NOW);
    if (!lib_) lib_ = dlopen("libcupti.so.13", RTLD_NOW);
    if (!lib_) {
      std::fprintf(stderr, "timeline: CUPTI (libcupti.so) is not on the library path: %s\n", dlerror());
      return false;
    }
    bool ok = true;
    auto sym = [&](const char* name) {
      void* f = dlsym(lib_, name);
      ok = ok && f;
      return f;
    };
    register_ = reinterpret_cast<decltype(register_)>(sym("cuptiActivityRegisterCallbacks"));
    enable_ = reinterpret_cast<decltype(enable_)>(sym("cuptiActivityEnable"));
    disable_ = reinterpret_cast<decltype(disable_)>(sym("cuptiActivityDisable"));
    flush_ = reinterpret_cast<decltype(flush_)>(sym("cuptiActivityFlushAll"));
    next_ = reinterpret_cast<decltype(next_)>(sym("cuptiActivityGetNextRecord"));
    now_ = reinterpret_cast<decltype(now_)>(sym("cuptiGetTimestamp"));
    cb_name_ = reinterpret_cast<decltype(cb_name_)>(sym("cuptiGetCallbackName"));
    if (!ok) {
      std::fprintf(stderr, "timeline: this CUPTI lacks the activity API\n");
      return false;
    }
    self() = this;
    if (register_(&requested, &completed) != CUPTI_SUCCESS) return fail("cuptiActivityRegisterCallbacks");
    for (CUpti_ActivityKind k : kinds())
      if (enable_(k) != CUPTI_SUCCESS) return fail("cuptiActivityEnable");
    now_(&t0_);
    return true;
  }

  // Stops recording and prints the summary of the stretch (label: what it was).
  void end(const char* label) {
    now_(&t1_);
    for (CUpti_ActivityKind k : kinds()) disable_(k);
    flush_(1);  // CUPTI_ACTIVITY_FLAG_FLUSH_FORCED
    print(label);
  }

 private:
  struct Span {
    uint64_t start, end;
  };
  static std::vector<CUpti_ActivityKind> kinds() {
    return {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_MEMCPY, CUPTI_ACTIVITY_KIND_MEMSET,
            CUPTI_ACTIVITY_KIND_RUNTIME, CUPTI_ACTIVITY_KIND_DRIVER};
  }
  static CuptiTimeline*& self() {
    static CuptiTimeline* t = nullptr;
    return t;
  }
  bool fail(const char* what) {
    std::fprintf(stderr, "timeline: %s failed\n", what);
    return false;
  }
  static void CUPTIAPI requested(uint8_t** buffer, size_t* size, size_t* max_records) {
    constexpr size_t kBytes = size_t(8) << 20;
    *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBytes));
    *size = *buffer ? kBytes : 0;
    *max_records = 0;
  }
  static void CUPTIAPI completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
    CuptiTimeline* t = self();
    CUpti_Activity* r = nullptr;
    while (t && t->next_(buffer, valid, &r) == CUPTI_SUCCESS) t->take(r);
    std::free(buffer);
  }
  void take(const CUpti_Activity* r) {
    std::lock_guard<std::mutex> lock(mu_);
    // a kernel, copy or memset: its span on the device, and its time under its name
    auto on_device = [&](uint64_t start, uint64_t end, const std::string& name) {
      device_.push_back({start, end});
      Total& tot = kernels_[name];
      tot.n += 1, tot.ns += end - start;
    };
    switch (r->kind) {
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
      case CUPTI_ACTIVITY_KIND_KERNEL: {
        const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(r);
        on_device(k->start, k->end, demangled(k->name));
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(r);
        on_device(m->start, m->end, "(copy)");
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(r);
        on_device(m->start, m->end, "(memset)");
        break;
      }
      case CUPTI_ACTIVITY_KIND_RUNTIME:
      case CUPTI_ACTIVITY_KIND_DRIVER: {  // (runtime calls make driver calls inside them: the union counts once)
        const bool runtime = r->kind == CUPTI_ACTIVITY_KIND_RUNTIME;
        const auto* a = reinterpret_cast<const CUpti_ActivityAPI*>(r);
        const char* name = nullptr;
        if (cb_name_(runtime ? CUPTI_CB_DOMAIN_RUNTIME_API : CUPTI_CB_DOMAIN_DRIVER_API, a->cbid, &name) !=
                CUPTI_SUCCESS ||
            !name)
          name = "(call)";
        Total& tot = (runtime ? calls_ : driver_)[name];
        tot.n += 1, tot.ns += a->end - a->start;
        host_.push_back({a->start, a->end});
        break;
      }
      default:
        break;
    }
  }
  static std::string demangled(const char* name) {
    if (!name) return "(kernel)";
    int status = 0;
    char* d = abi::__cxa_demangle(name, nullptr, nullptr, &status);
    std::string s = status == 0 && d ? d : name;
    std::free(d);
    for (const std::string cut : {"(anonymous namespace)::", "fathom::cuda::", "void "})
      for (size_t at; (at = s.find(cut)) != std::string::npos;) s.erase(at, cut.size());
    // the name without its argument list (the last top-level parenthesis)
    int depth = 0;
    for (size_t i = s.size(); i-- > 0;) {
      if (s[i] == ')') ++depth;
      if (s[i] == '(' && --depth == 0) {
        if (i > 0) s.resize(i);
        break;
      }
    }
    if (s.size() > 70) s = s.substr(0, 67) + "...";
    return s;
  }
  // The total length of the union of the spans inside [t0_, t1_].
  uint64_t covered(std::vector<Span> v) const {
    std::sort(v.begin(), v.end(), [](const Span& a, const Span& b) { return a.start < b.start; });
    uint64_t total = 0, cur_s = 0, cur_e = 0;
    bool open = false;
    for (Span s : v) {
      s.start = std::max(s.start, t0_), s.end = std::min(s.end, t1_);
      if (s.end <= s.start) continue;
      if (open && s.start <= cur_e) {
        cur_e = std::max(cur_e, s.end);
        continue;
      }
      if (open) total += cur_e - cur_s;
      cur_s = s.start, cur_e = s.end, open = true;
    }
    if (open) total += cur_e - cur_s;
    return total;
  }
  void print(const char* label) const {
    const double wall = double(t1_ - t0_) / 1e3;  // µs
    const double busy = double(covered(device_)) / 1e3, in_calls = double(covered(host_)) / 1e3;
    uint64_t kernel_ns = 0, launches = 0;
    for (const auto& [name, t] : kernels_) kernel_ns += t.ns, launches += t.n;
    std::printf("\ntimeline of %s (CUPTI): %.0f us of wall time\n", label, wall);
    std::printf("  GPU busy (kernels, copies, memsets; their union) %.0f us = %.1f%%; %llu of them, %.1f us each on "
                "average\n",
                busy, 100 * busy / wall, (unsigned long long)launches,
                launches ? double(kernel_ns) / 1e3 / double(launches) : 0.0);
    std::printf("  host inside CUDA runtime or driver calls %.0f us = %.1f%%; outside them %.0f us = %.1f%%\n", in_calls,
                100 * in_calls / wall, wall - in_calls, 100 * (wall - in_calls) / wall);
    auto top = [](const std::map<std::string, Total>& m, size_t n) {
      std::vector<std::pair<std::string, Total>> v(m.begin(), m.end());
      std::sort(v.begin(), v.end(), [](const auto& a, const auto& b) { return a.second.ns > b.second.ns; });
      if (v.size() > n) v.resize(n);
      return v;
    };
    std::printf("\n| runtime call | calls | host us | us a call |\n|---|---|---|---|\n");
    for (const auto& [name, t] : top(calls_, 10))
      std::printf("| %s | %llu | %.0f | %.1f |\n", name.c_str(), (unsigned long long)t.n, double(t.ns) / 1e3,
                  double(t.ns) / 1e3 / double(t.n));
    std::printf("\n| driver call (cuBLAS and the runtime make them) | calls | host us | us a call |\n|---|---|---|---|\n");
    for (const auto& [name, t] : top(driver_, 6))
      std::printf("| %s | %llu | %.0f | %.1f |\n", name.c_str(), (unsigned long long)t.n, double(t.ns) / 1e3,
                  double(t.ns) / 1e3 / double(t.n));
    std::printf("\n| kernel | launches | device us | share of busy |\n|---|---|---|---|\n");
    for (const auto& [name, t] : top(kernels_, 15))
      std::printf("| %s | %llu | %.0f | %.1f%% |\n", name.c_str(), (unsigned long long)t.n, double(t.ns) / 1e3,
                  busy > 0 ? 100 * double(t.ns) / 1e3 / busy : 0.0);
  }

  struct Total {
    uint64_t n = 0, ns = 0;
  };
  void* lib_ = nullptr;
  CUptiResult(CUPTIAPI* register_)(CUpti_BuffersCallbackRequestFunc, CUpti_BuffersCallbackCompleteFunc) = nullptr;
  CUptiResult(CUPTIAPI* enable_)(CUpti_ActivityKind) = nullptr;
  CUptiResult(CUPTIAPI* disable_)(CUpti_ActivityKind) = nullptr;
  CUptiResult(CUPTIAPI* flush_)(uint32_t) = nullptr;
  CUptiResult(CUPTIAPI* next_)(uint8_t*, size_t, CUpti_Activity**) = nullptr;
  CUptiResult(CUPTIAPI* now_)(uint64_t*) = nullptr;
  CUptiResult(CUPTIAPI* cb_name_)(CUpti_CallbackDomain, uint32_t, const char**) = nullptr;
  uint64_t t0_ = 0, t1_ = 0;
  std::mutex mu_;
  std::vector<Span> device_, host_;
  std::map<std::string, Total> kernels_, calls_, driver_;
};

}  // namespace fathom::bench
