// Spelling differences between the torch versions we build against (Debian's 1.13 and 2.x wheels).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/version.h>

#if TORCH_VERSION_MAJOR >= 2
#include <optional>
#else
#include <c10/util/Optional.h>
#endif

namespace retention {

// `Tensor?` in an op schema: c10::optional on 1.13, std::optional on 2.x (c10::optional is a
// deprecated alias there and slated for removal).
#if TORCH_VERSION_MAJOR >= 2
using OptTensor = std::optional<at::Tensor>;
using OptDouble = std::optional<double>;
#else
using OptTensor = c10::optional<at::Tensor>;
using OptDouble = c10::optional<double>;
#endif

}  // namespace retention
