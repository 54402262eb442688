// The backward passes the training code uses: the CPU reference implementations
// (src/ops/cpu/backward.h, where each is documented beside the forward it differentiates), named
// in fathom::train. The same passes are Ops methods (ops.h), which the CUDA backend implements too.
#pragma once

#include "ops/cpu/backward.h"

namespace fathom::train {
using cpu::attention_backward;
using cpu::cross_entropy_backward;
using cpu::embedding_backward;
using cpu::matmul_backward;
using cpu::moe_gate_backward;
using cpu::rmsnorm_backward;
using cpu::rope_backward;
using cpu::silu_mul_backward;
}  // namespace fathom::train
