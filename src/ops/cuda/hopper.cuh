// Hopper (sm_90a) machinery shared by the kernels that use it (fp8_gemm.cu, flash_attention.cu):
// mbarriers, TMA bulk tensor copies, thread-block clusters, wgmma shared-memory descriptors and
// the wgmma group fences. Device functions exist only in an sm_90a image (FATHOM_SM90A); the
// host functions (hopper.cu) say whether the running device has such an image and encode the
// tensor maps TMA copies from.
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FATHOM_SM90A 1
#endif

namespace fathom::cuda {

// Whether the current device runs this build's sm_90a kernels: an H100/H200 (compute 9.0) and a
// kernel image with sm_90a's instructions, found by running a probe kernel once per device (not
// from the compute capability alone). False inside a graph capture the first time (the probe is
// refused then and asked again later): callers ask once before any capture (their *_setup).
bool sm90a_available();
// The driver's cuTensorMapEncodeTiled (through the runtime's entry-point query: no -lcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder();

// Whether one producer warpgroup at `producer` registers a thread and `consumers` warpgroups at
// `consumer` fit in what the launch gave each thread (the SM's 64K registers over the block of
// consumers + 1 warpgroups, in steps of 8): past it, the consumers' setmaxnreg.inc waits forever,
// with no error (an FP8 GEMM producer at 48 beside two consumers at 232 hung, 2026-12-02). For a
// static_assert beside each pair.
constexpr bool setmaxnreg_fits(int producer, int consumer, int consumers) {
  return producer + consumers * consumer <= (consumers + 1) * (65536 / (128 * (consumers + 1)) / 8 * 8);
}

#ifdef FATHOM_SM90A
__device__ inline void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ inline void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ inline void st_shared_f32(uint32_t addr, float v) {
  asm volatile("st.shared.f32 [%0], %1;" ::"r"(addr), "f"(v) : "memory");
}
__device__ inline void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// Waits for the phase of the given parity to complete. A copy that never lands would hang the
// GPU; after 10 s the kernel stops with an illegal-address fault instead (a launch error at the
// next synchronization). Not __trap(): ptxas then ignores setmaxnreg's larger register budget in
// the code around it (a warp-specialized consumer spilled at the entry cap with it).
__device__ inline void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  uint64_t start = 0;
  for (int spins = 0;; ++spins) {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    if (done) return;
    uint64_t now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    if (spins == 0) start = now;
    else if (now - start > 10000000000ull) *reinterpret_cast<volatile int*>(uintptr_t(8)) = 1;
  }
}
// A 2-D tile [c0, c0 + box0) x [c1, c1 + box1) of the tensor map into shared memory, completing
// on bar (elements outside the tensor arrive as zeros and count as bytes).
__device__ inline void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

// `bytes` contiguous bytes from global memory into shared memory by the copy engine (no tensor
// map), completing on bar; src, dst and bytes multiples of 16.
__device__ inline void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
               "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(bar)
               : "memory");
}

// The same copy delivered to the same shared-memory offset (and mbarrier offset) of every CTA of
// the cluster in cta_mask: one L2 read feeds several blocks.
__device__ inline void tma_load_2d_multicast(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar,
                                             uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%2, "
      "%3}], [%4], %5;" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar), "h"(cta_mask)
      : "memory");
}
// Arrives on the mbarrier at the same offset in CTA `rank` of the cluster (itself included).
__device__ inline void mbar_arrive_cluster(uint32_t bar, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(bar), "r"(rank));
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(remote) : "memory");
}
// Every thread of the cluster's blocks: what each did to shared memory before is visible to all after.
__device__ inline void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// The shared-memory matrix descriptor of a K-major tile stored as TMA writes it with 128-byte
// swizzle: rows of 128 bytes, 8-row groups 1024 bytes apart (the stride byte offset); the
// leading byte offset is unused in this mode. The tile starts 1024-byte aligned; K steps of 32
// e4m3 within the row advance the start address by 32 bytes.
__device__ inline uint64_t sw128_desc(uint32_t addr) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}
// A 3-D tile [c0, c0 + box0) x [c1, ..) x [c2, ..) of the tensor map, completing on bar.
__device__ inline void tma_load_3d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}

// An MN-major operand (the transposed B of wgmma: N contiguous) stored as TMA writes 64-element
// wide, 128-byte swizzled boxes: rows of K 128 bytes apart, 8-row groups 1024 bytes apart (the
// stride byte offset), the next 64 columns of N `lbo` bytes on (the leading byte offset: one box).
__device__ inline uint64_t sw128_desc_mn(uint32_t addr, uint32_t lbo) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(lbo >> 4) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

__device__ inline void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ inline void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Pins registers at this point of the program: the compiler orders plain register arithmetic
// freely around the wgmma asm statements (they carry no dependence on registers that a running
// wgmma reads or writes), so accumulators are fenced after a wait (read no earlier) and values
// meant to be computed while wgmmas run are fenced before the wait (computed no later).
template <int N>
__device__ inline void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N, int M>
__device__ inline void fence_regs(uint32_t (&r)[N][M]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < M; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}
// Warp specialization: a warpgroup gives registers back (dec) or takes them (inc), all its threads
// at once; the counts of a block must balance (e.g. a producer 24, two consumers 240 out of 3 x 168).
template <int N>
__device__ inline void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ inline void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
// Named barriers (id 1-15; 0 is __syncthreads) over `threads` threads: sync waits for the phase,
// arrive only counts this warp in.
__device__ inline void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ inline void named_bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// TMA store: the box at (c0, c1) of the tensor map from shared memory (laid out as the map's
// swizzle says), in this thread's bulk group; bulk_commit closes the group, bulk_wait_read<N>
// returns once at most N groups still read shared memory, bulk_wait<N> once at most N are
// unfinished. Shared-memory writes by the generic proxy that a store reads need
// fence_proxy_async_smem() between them and the store.
__device__ inline void tma_store_2d(const CUtensorMap* map, uint32_t src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(src), "r"(c0), "r"(c1)
               : "memory");
}
__device__ inline void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
template <int N>
__device__ inline void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}
template <int N>
__device__ inline void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;" ::"n"(N) : "memory");
}
__device__ inline void fence_proxy_async_smem() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
__device__ inline void st_shared_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}
__device__ inline uint32_t ld_shared_u32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr) : "memory");
  return v;
}

// Returns once at most N of this warpgroup's committed wgmma groups are still running.
template <int N>
__device__ inline void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
#endif

}  // namespace fathom::cuda
