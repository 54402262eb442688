// The grouped (token-permutation) path of moe_experts, for batches where experts see many
// tokens each (moe_grouped.cu); moe.cu's launcher chooses between it and the gather path.
#pragma once
#include <cuda_runtime.h>

#include "ops/cuda/cuda_ops.h"

namespace fathom::cuda {
// Same contract as moe_experts (cuda_ops.h); the caller has checked the parameters. A shared
// expert (has_shared) only where moe_grouped_joins_shared(p): the tensor-core tiles of decode
// batches take it as extra tiles in the same launches.
void moe_experts_grouped(const MoeExpertsParams& p, cudaStream_t stream);
bool moe_grouped_joins_shared(const MoeExpertsParams& p);
// Whether the grouped path would run p's experts on its tensor-core small tiles (decode batches).
bool moe_grouped_on_tensor_cores(const MoeExpertsParams& p);
}  // namespace fathom::cuda
