// The shapes the attention backward's GPU kernels are checked on, against the CPU: by
// CudaBackward.Attention / AttentionTiled / AttentionGemm (tests/test_cuda_backward.cpp) on the GPU, and by the CPU
// emulation of the tiled kernels (scripts/kernel-emu) without one. Ragged tiles, several stacked
// sequences, GQA, queries after a prefix, non-causal, the widest heads, one token.
#pragma once

#include <cstdint>

namespace fathom::test {

struct AttentionBackwardCase {
  const char* what;
  int64_t n_q, n_kv, q_pos0;
  int hq, hkv, dqk, dv;
  bool causal;
  int64_t n_seq;
};

inline constexpr AttentionBackwardCase kAttentionBackwardCases[] = {
    {"MLA training shape, causal", 40, 40, 0, 4, 4, 192, 128, true, 1},
    {"fathom-mini's shape, 3 sequences of 100 (ragged tiles)", 100, 100, 0, 6, 6, 96, 64, true, 3},
    {"GQA, odd dims, 2 sequences", 17, 17, 0, 6, 2, 33, 17, true, 2},
    {"queries after a prefix (q_pos0 > 0)", 5, 70, 65, 2, 1, 48, 32, true, 1},
    {"not causal, several tiles", 33, 70, 0, 3, 3, 64, 64, false, 2},
    {"widest heads (256)", 37, 37, 0, 2, 1, 256, 256, true, 1},
    {"one token", 1, 1, 0, 2, 2, 8, 8, true, 1},
};

}  // namespace fathom::test
