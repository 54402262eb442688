// The CUDA backend's entry points in a build without CUDA: asking for it is a user error that
// says how to get it.
#include "core/error.h"
#include "ops/ops.h"

namespace fathom {

std::unique_ptr<Ops> make_cuda_ops(int) {
  throw Error(
      "--device cuda was requested but this fathom was built without CUDA (nvcc was not found when CMake "
      "configured it); install the CUDA toolkit and rebuild, or use --device cpu");
}

bool cuda_available() { return false; }

}  // namespace fathom
