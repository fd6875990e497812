// recurrence.cuh - the token-by-token state update, shared by the scan (recurrent.cu) and the
// decode step (msr_step.cu).
#pragma once

#include "gpu_compat.h"

namespace retention::kernels {

// 1 - gamma from log gamma without cancellation.  gamma = expf(log gamma) rounded to fp32 is off
// by up to 2^-25 near 1, a relative error of 2^-25 / (1 - gamma) in the decay rate (1% at
// gamma = 1 - 3e-6) that every step repeats in the same direction, compounded over the
// ~1 / (1 - gamma) tokens the state remembers; expm1f keeps fp32's relative precision in 1 - gamma.
// (The CPU scans do the same from double.)
RT_DEVICE float one_minus_gamma(float log_gamma) { return -expm1f(log_gamma); }

// One element of S <- gamma S + k v, as S - (1 - gamma) S + k v.
RT_DEVICE float decay_update(float s, float one_minus_g, float k, float v) {
  return fmaf(k, v, fmaf(-one_minus_g, s, s));
}

}  // namespace retention::kernels
