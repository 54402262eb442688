// Warp-collective tensor-core and shared-memory instructions for the kernel emulators in this
// folder, emulated as the collectives they are: every lane of the warp hands its operands in
// through the warp's exchange space (emu_runtime.h's BlockState::xslot) between two warp
// barriers, and each lane computes its own part of the result from all 32 lanes' operands by the
// PTX fragment layouts. Used by mma_gemv_emu.cpp (mma.sync) and mla_attention_emu.cpp (mma.sync
// and ldmatrix).
#pragma once
#include <cstdint>
#include <cstring>

#include "core/dtype.h"
#include "emu_runtime.h"

namespace emu {

// One 16-bit value of a packed register: half h (0 low, 1 high).
inline float part16(uint32_t r, int h, bool bf16) {
  const uint16_t v = uint16_t(h ? r >> 16 : r);
  return bf16 ? fathom::bf16_to_f32(v) : fathom::f16_to_f32(v);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: every lane of the warp hands in its registers;
// lane (g, tig) holds a0..a7 = A[g][2tig..+1], A[g+8][2tig..+1], A[g][2tig+8..+9], A[g+8][2tig+8..+9]
// (registers a0..a3 two values each), b0..b3 = B[2tig..+1][g], B[2tig+8..+9][g] (registers b0, b1),
// c = C[g][2tig..+1], C[g+8][2tig..+1].
inline void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1,
                      bool bf16) {
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tig = lane % 4;
  auto& slot = tl_block->xslot[w];
  syncwarp(__LINE__);
  const uint32_t mine[6] = {a0, a1, a2, a3, b0, b1};
  std::memcpy(slot[lane], mine, sizeof mine);
  syncwarp(__LINE__);
  auto A = [&](int r, int k) {
    const int l = (r % 8) * 4 + (k % 8) / 2, reg = (r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return part16(slot[l][reg], k % 2, bf16);
  };
  auto B = [&](int k, int n) {
    const int l = n * 4 + (k % 8) / 2, reg = 4 + (k >= 8 ? 1 : 0);
    return part16(slot[l][reg], k % 2, bf16);
  };
  double d[4] = {c[0], c[1], c[2], c[3]};
  for (int k = 0; k < 16; ++k) {
    d[0] += double(A(g, k)) * B(k, 2 * tig);
    d[1] += double(A(g, k)) * B(k, 2 * tig + 1);
    d[2] += double(A(g + 8, k)) * B(k, 2 * tig);
    d[3] += double(A(g + 8, k)) * B(k, 2 * tig + 1);
  }
  for (int i = 0; i < 4; ++i) c[i] = float(d[i]);
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 over `base` (the block's shared memory;
// addresses are byte offsets into it): lane 8j + i gives the address of row i of matrix j; lane l
// receives in r[j] matrix j's elements (row l / 4, columns 2 (l % 4) and + 1), or with .trans
// (rows 2 (l % 4) and + 1, column l / 4) — two 16-bit values, the first in the low half.
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr, const unsigned char* base, bool trans) {
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  auto& slot = tl_block->xslot[w];
  syncwarp(__LINE__);
  slot[lane][0] = addr;
  syncwarp(__LINE__);
  auto at = [&](int row_lane, int col) {
    uint16_t v;
    std::memcpy(&v, base + slot[row_lane][0] + 2 * col, 2);
    return uint32_t(v);
  };
  for (int j = 0; j < 4; ++j) {
    if (!trans) {
      const int row = 8 * j + lane / 4, col = 2 * (lane % 4);
      r[j] = at(row, col) | at(row, col + 1) << 16;
    } else {
      const int row = 8 * j + 2 * (lane % 4), col = lane / 4;
      r[j] = at(row, col) | at(row + 1, col) << 16;
    }
  }
}

}  // namespace emu
