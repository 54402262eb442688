// Measured memory read bandwidth: the limit that the decode matmul (which reads every weight
// byte once) is compared against. Benchmarks re-measure it in the same run because the figure
// drifts from run to run and machine to machine.
#pragma once
#include <cstddef>

#include "core/thread_pool.h"

namespace fathom::cpu {

// Best of `passes` timed passes in which all pool threads together read a buffer of
// bytes_per_pass bytes (each thread its own contiguous part) with wide loads whose sum is
// kept, so the compiler cannot drop them. Returns GB/s (1e9 bytes per second). The buffer is
// allocated and written once before timing; make it much larger than the last-level cache to
// measure DRAM rather than cache.
double measure_read_bandwidth(ThreadPool& pool, size_t bytes_per_pass = size_t(512) << 20, int passes = 5);

}  // namespace fathom::cpu
