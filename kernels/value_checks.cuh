// value_checks.cuh - the checks of input values that live on the device.
//
// The glue checks shapes, dtypes and devices on the host, but not the values of device tensors:
// reading them would copy to the host, i.e. synchronise every call and break CUDA-graph capture.
// The kernels that already run check them instead, one thread per CTA before the CTA writes
// anything; the CTAs of a launch together see every value.  A failed check stops the launch as a
// device-side assert does, and every later call reports it (RT_DEVICE_CHECK, gpu_compat.h).
#pragma once

#include <cstdint>

#include "gpu_compat.h"
#include "msr_kernels.h"

namespace retention::kernels {

RT_DEVICE void check_log_decay(float log_gamma) {
  RT_DEVICE_CHECK(log_gamma <= 0.f, "retention: log_decay must be <= 0 and not NaN");
}

RT_DEVICE void check_position(std::int64_t pos) {
  RT_DEVICE_CHECK(pos >= 0, "retention: offsets must be non-negative positions");
}

// Entry i of cu_seqlens (int32 or int64), as stored.
RT_DEVICE std::int64_t cu_seqlens_at(const MsrSequences& s, std::int64_t i) {
  return s.cu_seqlens_int64 ? static_cast<const std::int64_t*>(s.cu_seqlens)[i]
                            : static_cast<const std::int32_t*>(s.cu_seqlens)[i];
}

// Sequence n of cu_seqlens: it starts where the previous one ends, so checking that every
// sequence has begin <= end, the first begins at 0 and the last ends at T checks the whole tensor.
RT_DEVICE void check_sequence(const MsrSequences& s, std::int64_t n, std::int64_t T) {
  if (s.cu_seqlens == nullptr) return;
  const std::int64_t begin = cu_seqlens_at(s, n), end = cu_seqlens_at(s, n + 1);
  RT_DEVICE_CHECK(begin <= end && (n > 0 || begin == 0) && (n + 1 < s.num_sequences || end == T),
                  "retention: cu_seqlens must start at 0, end at T and be non-decreasing");
}

// Everything CTA (sequence n, head h) of a fused-op kernel reads: log_decay[h], offsets[n] and
// sequence n of cu_seqlens.
template <class P>
RT_DEVICE void check_msr_values(const P& p, int n, int h) {
  if (threadIdx.x != 0) return;
  check_log_decay(p.log_decay[h]);
  if (p.seq.offsets != nullptr) check_position(p.seq.offsets[n]);
  check_sequence(p.seq, n, p.shape.T);
}

}  // namespace retention::kernels
