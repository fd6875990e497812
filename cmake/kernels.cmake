# The GPU kernels' build, defined once.  Every build of kernels/ reads this file:
#
#   cmake/gpu.cmake               the CMake targets (include): CUDA, HIP and the host emulator,
#                                 which scripts/test-kernels-host.sh builds per device model
#   setup.py                      the Python extension (parses the set() lines below)
#   .ci/gpu_compile_check.sh      the ptxas / hipcc resource reports  } eval "$(cmake -P
#   bench/gpu_prepare.sh          the sm_90 build for a GPU machine   }   cmake/kernels.cmake)"
#
# So keep every set() one plain list of words (no quotes, variables or generator expressions):
# setup.py reads them with a regular expression, not with CMake.  The resource reports add only
# report flags (-Xptxas -v, -save-temps) to the flags below, so what they check is what ships.

# Translation units under kernels/, longest compile first so parallel builds start them first.
# instances/ holds one dtype's instantiations per file: the chunk kernels' dtype x dk bucket x
# fusion sets are most of the build, and split this way they compile in parallel.
set(RETENTION_KERNEL_SOURCES
  instances/msr_fwd_f32.cu instances/msr_fwd_f16.cu instances/msr_fwd_bf16.cu
  instances/msr_bwd_f32.cu instances/msr_bwd_f16.cu instances/msr_bwd_bf16.cu
  msr_bwd.cu msr_fwd.cu chunk_bwd.cu chunk_fwd.cu msr_step.cu recurrent.cu)

# Launchers only (their kernels are instantiated in instances/): ptxas reports no entry
# function for these, and the compile check must not take that for a failure.
set(RETENTION_KERNEL_LAUNCHER_SOURCES msr_fwd.cu chunk_bwd.cu chunk_fwd.cu)

# The kernel GoogleTests under tests/cpp/kernels/ (one binary; single sources for every backend).
set(RETENTION_KERNEL_TEST_SOURCES test_kernels.cu test_msr.cu)

# nvcc.  The __CUDA_NO_HALF* macros are what torch's extension builder adds to every .cu file,
# and NDEBUG what CMake's release builds add; every build uses both, so every build compiles the
# same kernel code (the kernels' device checks do not depend on NDEBUG).  -lineinfo: source
# lines for ncu and compute-sanitizer, no change to the code.  The C++ standard and the architectures
# are the build's (CMAKE_CUDA_STANDARD / setup.py's; CMAKE_CUDA_ARCHITECTURES /
# TORCH_CUDA_ARCH_LIST), sm_80 and sm_90 by default.
set(RETENTION_KERNEL_CUDA_FLAGS
  -O3 -DNDEBUG --expt-relaxed-constexpr -lineinfo
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__)
set(RETENTION_KERNEL_CUDA_ARCHS 80 90)

# hipcc (always with explicit --offload-arch: auto-detection needs a GPU).  The __HIP_NO_HALF*
# macros are torch's and NDEBUG CMake's, as above.  -Wno-unused-result: the HIP runtime calls are [[nodiscard]].  No
# -fgpu-flush-denormals-to-zero: the CUDA build keeps denormals and the float64 references
# assume IEEE fp32, so both vendors round the same way.
set(RETENTION_KERNEL_HIP_FLAGS
  -O3 -DNDEBUG -fPIC -Wno-unused-result -D__HIP_NO_HALF_OPERATORS__=1 -D__HIP_NO_HALF_CONVERSIONS__=1)
set(RETENTION_KERNEL_HIP_ARCHS gfx90a)

# The host emulator (kernels/host_emu/): the same sources as C++ under g++, plus the device
# model's warp width (-DRETENTION_EMU_WARP=32 or 64) and each build's optimisation,
# instrumentation or sanitizer flags.
set(RETENTION_KERNEL_EMU_FLAGS
  -std=c++17 -g -DRETENTION_HOST_EMU -Wall -Wno-unused-function -Wno-unknown-pragmas)
set(RETENTION_KERNEL_EMU_SOURCES host_emu/runtime.cpp)
set(RETENTION_KERNEL_EMU_TEST_SOURCES test_host_emu.cpp emu_test_main.cpp)

# cmake -P cmake/kernels.cmake: the lists above as bash arrays, for the scripts.
if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  foreach(_var SOURCES LAUNCHER_SOURCES TEST_SOURCES CUDA_FLAGS CUDA_ARCHS HIP_FLAGS HIP_ARCHS
               EMU_FLAGS EMU_SOURCES EMU_TEST_SOURCES)
    string(REPLACE ";" " " _words "${RETENTION_KERNEL_${_var}}")
    execute_process(COMMAND "${CMAKE_COMMAND}" -E echo "KERNEL_${_var}=(${_words})")
  endforeach()
endif()
