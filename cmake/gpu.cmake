# GPU build of retention: RETENTION_GPU = OFF (default) | CUDA | HIP | EMU.
#
# Included from the top-level CMakeLists.txt *before* find_package(Torch): the CUDA language and
# its architectures must be set up before Torch's CMake package runs (a CUDA build of torch
# resets CMAKE_CUDA_ARCHITECTURES to OFF in the caller's scope, so the list is kept here in
# RETENTION_CUDA_ARCHS and put on every CUDA target explicitly).  retention_gpu_targets(),
# called once `retention` and the tests are defined, adds the targets:
#
#   CUDA  retention_kernels (static, torch-free: the kernel sources of cmake/kernels.cmake, nvcc).  With a CUDA build of torch
#         also the op glue csrc/cuda/*.cu, and both go into libretention, so C++ apps get the
#         CUDA kernels.  With a CPU-only torch the glue is skipped (STATUS message).
#   HIP   retention_kernels_hip (static, torch-free: the same sources compiled by hipcc -x hip
#         --offload-arch=...).  Not CMake's HIP language: CMake < 3.28 does not find the
#         hip-lang package in Debian's multiarch layout, and hipcc must never auto-detect the
#         GPU (it crashes on machines without one), so every hipcc call names the arches.
#         The torch glue for ROCm is not built by CMake (see retention_gpu_targets()).
#   EMU   retention_kernels_emu (static: the same sources as C++ under the host emulator,
#         kernels/host_emu/, for one device model: RETENTION_EMU_WARP = 32 (NVIDIA) or 64 (AMD)).
#         No GPU and no torch glue; scripts/test-kernels-host.sh builds it per model and
#         sanitizer with CMAKE_BUILD_TYPE=Emulator and its flags in CMAKE_CXX_FLAGS.
#   tests (RETENTION_BUILD_TESTS): tests/cpp/kernels/ - the kernel GoogleTest for the chosen
#         backend (its GPU tests skip without a device; ctest reports them as skipped) and the
#         host-only fragment-layout test.
#
# The sources, flags and default architectures come from cmake/kernels.cmake, which every other
# build of the kernels reads too.
#
# Options:  RETENTION_GPU, CMAKE_CUDA_ARCHITECTURES (default 80;90, sm_80 or newer),
#           RETENTION_HIP_ARCHS (default gfx90a, CDNA only), RETENTION_HIPCC (hipcc path),
#           RETENTION_EMU_WARP (32 or 64).

include("${CMAKE_CURRENT_LIST_DIR}/kernels.cmake")

set(RETENTION_GPU OFF CACHE STRING "GPU kernels to build: OFF, CUDA, HIP or EMU (host emulator)")
set_property(CACHE RETENTION_GPU PROPERTY STRINGS OFF CUDA HIP EMU)

string(TOUPPER "${RETENTION_GPU}" _retention_gpu)
if(_retention_gpu MATCHES "^(|OFF|NO|FALSE|0|NONE)$")
  set(RETENTION_GPU_BACKEND OFF)
elseif(_retention_gpu STREQUAL "CUDA")
  set(RETENTION_GPU_BACKEND CUDA)
elseif(_retention_gpu MATCHES "^(HIP|ROCM)$")
  set(RETENTION_GPU_BACKEND HIP)
elseif(_retention_gpu STREQUAL "EMU")
  set(RETENTION_GPU_BACKEND EMU)
else()
  message(FATAL_ERROR "RETENTION_GPU must be OFF, CUDA, HIP or EMU (got '${RETENTION_GPU}')")
endif()
unset(_retention_gpu)

if(RETENTION_GPU_BACKEND STREQUAL "CUDA")
  # An explicit list, never "native": build machines often have no GPU, and the kernels need
  # sm_80 or newer (mma.sync m16n8k16 with bf16; gpu_compat.h rejects older targets).
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
    set(CMAKE_CUDA_ARCHITECTURES "${RETENTION_KERNEL_CUDA_ARCHS}" CACHE STRING
        "CUDA architectures to build for (sm_80 or newer)")
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    message(FATAL_ERROR "RETENTION_GPU=CUDA: no CUDA compiler found; put nvcc on PATH or pass "
                        "-DCMAKE_CUDA_COMPILER=/path/to/nvcc")
  endif()
  enable_language(CUDA)
  foreach(_arch IN LISTS CMAKE_CUDA_ARCHITECTURES)
    string(REGEX MATCH "^[0-9]+" _num "${_arch}")
    if(NOT _num OR _num LESS 80)
      message(FATAL_ERROR "RETENTION_GPU=CUDA: CMAKE_CUDA_ARCHITECTURES="
                          "'${CMAKE_CUDA_ARCHITECTURES}'; give explicit architectures, all sm_80 "
                          "or newer (e.g. 80;90)")
    endif()
  endforeach()
  set(RETENTION_CUDA_ARCHS "${CMAKE_CUDA_ARCHITECTURES}")
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  # torch uses the shared CUDA runtime; so does everything here (one runtime per process).
  set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
  find_package(CUDAToolkit REQUIRED)
  message(STATUS "retention: CUDA kernels for ${RETENTION_CUDA_ARCHS} "
                 "(nvcc ${CMAKE_CUDA_COMPILER_VERSION})")
elseif(RETENTION_GPU_BACKEND STREQUAL "HIP")
  set(RETENTION_HIP_ARCHS "${RETENTION_KERNEL_HIP_ARCHS}" CACHE STRING
      "AMD GPU architectures for hipcc --offload-arch (CDNA, wave64: gfx90a, gfx942, ...)")
  if(RETENTION_HIP_ARCHS STREQUAL "")
    message(FATAL_ERROR "RETENTION_HIP_ARCHS is empty; hipcc must be given explicit architectures")
  endif()
  foreach(_arch IN LISTS RETENTION_HIP_ARCHS)
    # RDNA (gfx10xx/11xx/12xx) runs wave32 and has no MFMA: gpu_compat.h refuses it.
    if(NOT _arch MATCHES "^gfx9")
      message(FATAL_ERROR "RETENTION_HIP_ARCHS: '${_arch}' is not a CDNA (gfx9xx, wave64) target "
                          "(\"native\" is not accepted either: name the architecture)")
    endif()
  endforeach()
  find_program(RETENTION_HIPCC hipcc
    HINTS ENV ROCM_PATH ENV HIP_PATH PATH_SUFFIXES bin
    PATHS /opt/rocm/bin
    DOC "hipcc used to compile the kernels for RETENTION_GPU=HIP")
  if(NOT RETENTION_HIPCC)
    message(FATAL_ERROR "RETENTION_GPU=HIP: hipcc not found; put it on PATH, set ROCM_PATH "
                        "or pass -DRETENTION_HIPCC=/path/to/hipcc")
  endif()
  # hipcc picks its platform at every call: AMD only where it finds a clang++ on PATH, else NVIDIA
  # whenever nvcc exists (Debian's clang-15, which hipcc depends on, installs no clang++), so
  # every call names the platform.
  set(RETENTION_HIPCC_COMMAND "${CMAKE_COMMAND}" -E env HIP_PLATFORM=amd "${RETENTION_HIPCC}")
  get_filename_component(_hip_bin "${RETENTION_HIPCC}" DIRECTORY)
  find_library(RETENTION_AMDHIP64_LIBRARY amdhip64
    HINTS "${_hip_bin}/../lib" ENV ROCM_PATH ENV HIP_PATH PATH_SUFFIXES lib lib64
    DOC "HIP runtime library linked by the HIP kernel library")
  if(NOT RETENTION_AMDHIP64_LIBRARY)
    message(FATAL_ERROR "RETENTION_GPU=HIP: the HIP runtime library (libamdhip64) was not found")
  endif()
  # The version line; the explicit arch keeps hipcc from probing for a GPU.
  list(GET RETENTION_HIP_ARCHS 0 _arch)
  execute_process(COMMAND ${RETENTION_HIPCC_COMMAND} --offload-arch=${_arch} --version
    OUTPUT_VARIABLE _hip_version ERROR_QUIET)
  string(REGEX MATCH "HIP version: [^\n]*" _hip_version "${_hip_version}")
  message(STATUS "retention: HIP kernels for ${RETENTION_HIP_ARCHS} "
                 "(${RETENTION_HIPCC}, ${_hip_version})")
  unset(_hip_bin)
  unset(_hip_version)
elseif(RETENTION_GPU_BACKEND STREQUAL "EMU")
  set(RETENTION_EMU_WARP 32 CACHE STRING
      "Lanes per warp of the emulated device: 32 (NVIDIA model) or 64 (AMD wave64 model)")
  if(NOT RETENTION_EMU_WARP MATCHES "^(32|64)$")
    message(FATAL_ERROR "RETENTION_EMU_WARP must be 32 or 64 (got '${RETENTION_EMU_WARP}')")
  endif()
  # Every emulated thread runs on its own stack, switched by boost::context.
  find_package(Boost REQUIRED COMPONENTS context)
  find_package(Threads REQUIRED)
  message(STATUS "retention: kernels under the host emulator, ${RETENTION_EMU_WARP}-lane warps")
endif()

# hipcc command line for one translation unit (a custom command; CMake's HIP language is not
# used, see above).  Extra arguments (the flags) are passed to hipcc before the source.
function(retention_hipcc_object out src)
  get_filename_component(_name "${src}" NAME_WE)  # unique: instances/ names say their dtype
  set(_obj "${CMAKE_CURRENT_BINARY_DIR}/hip/${_name}.o")
  set(_arch_flags)
  foreach(_arch IN LISTS RETENTION_HIP_ARCHS)
    list(APPEND _arch_flags "--offload-arch=${_arch}")
  endforeach()
  file(GLOB _headers CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/kernels/*.h"
                                       "${PROJECT_SOURCE_DIR}/kernels/*.cuh")
  file(RELATIVE_PATH _rel "${PROJECT_SOURCE_DIR}" "${src}")
  add_custom_command(OUTPUT "${_obj}"
    COMMAND "${CMAKE_COMMAND}" -E make_directory "${CMAKE_CURRENT_BINARY_DIR}/hip"
    COMMAND ${RETENTION_HIPCC_COMMAND} -x hip ${_arch_flags} -std=c++17
            "-I${PROJECT_SOURCE_DIR}/kernels" ${ARGN} -c "${src}" -o "${_obj}"
    DEPENDS "${src}" ${_headers}
    COMMENT "hipcc ${_rel} (${RETENTION_HIP_ARCHS})"
    COMMAND_EXPAND_LISTS VERBATIM)
  set(${out} "${_obj}" PARENT_SCOPE)
endfunction()

# The .cu kernel sources compiled as C++ by the host compiler (the emulator build).
function(retention_emu_sources)
  set_source_files_properties(${ARGN} PROPERTIES LANGUAGE CXX COMPILE_OPTIONS "-x;c++")
endfunction()

function(retention_gpu_targets)
  if(RETENTION_GPU_BACKEND STREQUAL "OFF")
    return()
  endif()
  list(TRANSFORM RETENTION_KERNEL_SOURCES PREPEND "${PROJECT_SOURCE_DIR}/kernels/"
       OUTPUT_VARIABLE _kernel_sources)

  if(RETENTION_GPU_BACKEND STREQUAL "CUDA")
    add_library(retention_kernels STATIC ${_kernel_sources})
    target_include_directories(retention_kernels PUBLIC "${PROJECT_SOURCE_DIR}/kernels")
    target_compile_options(retention_kernels PRIVATE
      "$<$<COMPILE_LANGUAGE:CUDA>:${RETENTION_KERNEL_CUDA_FLAGS}>")
    target_link_libraries(retention_kernels PUBLIC CUDA::cudart)
    set_target_properties(retention_kernels PROPERTIES
      CUDA_ARCHITECTURES "${RETENTION_CUDA_ARCHS}"
      POSITION_INDEPENDENT_CODE ON)

    # The op glue needs a CUDA build of torch (libc10_cuda, libtorch_cuda).
    if(TARGET c10_cuda OR TARGET torch_cuda OR TORCH_CUDA_LIBRARIES)
      file(GLOB _glue_sources CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/csrc/cuda/*.cu")
      add_library(retention_cuda_glue OBJECT ${_glue_sources})
      target_include_directories(retention_cuda_glue PRIVATE
        "${PROJECT_SOURCE_DIR}/csrc/include" "${PROJECT_SOURCE_DIR}/csrc"
        "${PROJECT_SOURCE_DIR}/kernels")
      target_link_libraries(retention_cuda_glue PRIVATE ${TORCH_LIBRARIES} CUDA::cudart)
      target_compile_options(retention_cuda_glue PRIVATE
        $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -lineinfo>)
      set_target_properties(retention_cuda_glue PROPERTIES
        CUDA_ARCHITECTURES "${RETENTION_CUDA_ARCHS}"
        CUDA_VISIBILITY_PRESET hidden
        POSITION_INDEPENDENT_CODE ON)
      target_sources(retention PRIVATE $<TARGET_OBJECTS:retention_cuda_glue>)
      target_link_libraries(retention PRIVATE retention_kernels CUDA::cudart)
      message(STATUS "retention: CUDA ops (csrc/cuda + kernels) are built into libretention")
    else()
      message(STATUS "retention: this torch has no CUDA (no c10_cuda): building the torch-free "
                     "CUDA kernel library retention_kernels and its tests only; libretention "
                     "stays CPU-only")
    endif()
  elseif(RETENTION_GPU_BACKEND STREQUAL "HIP")
    set(_objects)
    foreach(_src IN LISTS _kernel_sources)
      retention_hipcc_object(_obj "${_src}" ${RETENTION_KERNEL_HIP_FLAGS})
      list(APPEND _objects "${_obj}")
    endforeach()
    add_library(retention_kernels_hip STATIC ${_objects})
    set_target_properties(retention_kernels_hip PROPERTIES LINKER_LANGUAGE CXX)
    target_include_directories(retention_kernels_hip INTERFACE "${PROJECT_SOURCE_DIR}/kernels")
    target_link_libraries(retention_kernels_hip INTERFACE "${RETENTION_AMDHIP64_LIBRARY}")
    # The ROCm op glue would be csrc/cuda/*.cu hipified by torch's own build machinery, which
    # setup.py uses (a ROCm build of torch runs hipify + hipcc); CMake does not build it.
    if(TARGET c10_hip OR TARGET torch_hip)
      message(STATUS "retention: ROCm torch found, but the torch HIP op glue is built by setup.py "
                     "only; libretention stays CPU-only, retention_kernels_hip is torch-free")
    else()
      message(STATUS "retention: this torch has no ROCm (no c10_hip): building the torch-free "
                     "HIP kernel library retention_kernels_hip and its tests only; libretention "
                     "stays CPU-only")
    endif()
  elseif(RETENTION_GPU_BACKEND STREQUAL "EMU")
    list(TRANSFORM RETENTION_KERNEL_EMU_SOURCES PREPEND "${PROJECT_SOURCE_DIR}/kernels/"
         OUTPUT_VARIABLE _emu_sources)
    retention_emu_sources(${_kernel_sources})
    add_library(retention_kernels_emu STATIC ${_kernel_sources} ${_emu_sources})
    target_include_directories(retention_kernels_emu PUBLIC "${PROJECT_SOURCE_DIR}/kernels")
    target_compile_options(retention_kernels_emu PUBLIC ${RETENTION_KERNEL_EMU_FLAGS}
                                                        -DRETENTION_EMU_WARP=${RETENTION_EMU_WARP})
    target_link_libraries(retention_kernels_emu PUBLIC Boost::context Threads::Threads)
    # -std=c++17 comes from the flags, not gnu++17.
    set_target_properties(retention_kernels_emu PROPERTIES CXX_EXTENSIONS OFF)
  endif()

  if(RETENTION_BUILD_TESTS)
    add_subdirectory(tests/cpp/kernels)
  endif()
endfunction()
