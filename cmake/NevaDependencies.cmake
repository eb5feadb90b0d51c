# Every third-party dependency is found here, in one place (see third_party_notes.md).

# ccache: honour precompiled headers (ccache refuses PCH users unless told these are safe).
find_program(NEVA_CCACHE ccache)
if(NEVA_CCACHE AND NOT CMAKE_CXX_COMPILER_LAUNCHER)
  set(CMAKE_CXX_COMPILER_LAUNCHER
      ${CMAKE_COMMAND} -E env CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
      ${NEVA_CCACHE})
endif()

# LibTorch from the pinned PyPI torch wheel (CMAKE_PREFIX_PATH points at torch/share/cmake).
# The wheel is the CUDA build: its config needs the CUDA toolkit, which our machines have.
find_package(Torch 2.11 REQUIRED)
string(REGEX MATCH "^[0-9]+\\.[0-9]+\\.[0-9]+" NEVA_TORCH_VERSION "${Torch_VERSION}")
# LibTorch's own c10d + CUDA-side libraries; TORCH_LIBRARIES carries them.
add_library(neva_torch INTERFACE)
# The wheel's libtorch.so (built with GCC 13) exports its own copies of some libstdc++ symbols,
# std::filesystem among them; resolved against ours they crash (e.g. in filesystem::remove_all).
# Listing libstdc++ before LibTorch puts it first in the global lookup order, so ours win.
target_link_libraries(neva_torch INTERFACE -Wl,--push-state,--no-as-needed stdc++ -Wl,--pop-state ${TORCH_LIBRARIES})
target_compile_options(neva_torch INTERFACE ${TORCH_CXX_FLAGS})
# c10d's headers need these to declare the Gloo and NCCL backends; both are inside the wheel's libraries.
target_compile_definitions(neva_torch INTERFACE USE_DISTRIBUTED USE_C10D_GLOO USE_C10D_NCCL)
# fmt: exactly one copy, the headers LibTorch ships (fmt >= 11), header-only. Debian's libfmt is never used.
target_compile_definitions(neva_torch INTERFACE FMT_HEADER_ONLY)

find_package(tomlplusplus REQUIRED)          # Debian libtomlplusplus-dev
find_package(doctest REQUIRED)               # Debian doctest-dev
find_package(nlohmann_json 3.11 REQUIRED)    # Debian nlohmann-json3-dev
find_package(CLI11 REQUIRED)                 # Debian libcli11-dev
find_package(Boost 1.74 REQUIRED COMPONENTS filesystem)  # Boost.DLL is header-only over Boost.Filesystem
find_package(PkgConfig REQUIRED)
pkg_check_modules(pcre2 REQUIRED IMPORTED_TARGET libpcre2-8)           # Debian libpcre2-dev: tokenizer regexes
pkg_check_modules(sentencepiece REQUIRED IMPORTED_TARGET sentencepiece)  # Debian libsentencepiece-dev
find_package(JPEG REQUIRED)  # Debian libjpeg-dev (libjpeg-turbo): the decoder Pillow uses too
find_package(PNG REQUIRED)   # Debian libpng-dev
find_package(OpenSSL 3 REQUIRED COMPONENTS Crypto)  # Debian libssl-dev: SHA-256 of checkpoint files

# gloo's headers: the wheel links gloo statically but does not ship its headers, which
# ProcessGroupGloo.hpp includes. Debian's libgloo-dev provides them; we only call out-of-line
# ProcessGroupGloo entry points and never instantiate gloo types ourselves, and never link libgloo.
find_path(NEVA_GLOO_INCLUDE_DIR gloo/algorithm.h REQUIRED)

# OpenBLAS's cblas.h (Debian libopenblas-dev), for the types of the entry points core/src/nn/cpu_blas.cpp
# looks up in libopenblas.so.0 at run time (opened RTLD_LOCAL, never linked: LibTorch exports MKL's
# Fortran BLAS names, which OpenBLAS also defines).
find_path(NEVA_OPENBLAS_INCLUDE_DIR cblas.h PATHS /usr/include/${CMAKE_LIBRARY_ARCHITECTURE}/openblas-pthread
          NO_DEFAULT_PATH REQUIRED)

# CUDA toolkit headers for nccl.h (ProcessGroupNCCL.hpp); found by Torch's config already.
find_path(NEVA_NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} /usr/local/cuda/include REQUIRED)

# Aggregates initialised from their leading fields are intended (as in LibTorch's own flags).
set(NEVA_WARNINGS -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers -Werror=return-type
    -Werror=non-virtual-dtor)
# clang (the fuzz build) warns where a module's load(checkpoint, what) hides torch::nn::Module's
# load(archive), which neva never calls.
if(CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
  list(APPEND NEVA_WARNINGS -Wno-overloaded-virtual)
endif()

# Sanitizers (NEVA_SANITIZE, NEVA_FUZZ) for every target that takes neva_target_defaults, as PyTorch's
# ASAN CI builds: no recovery, frame pointers for stacks, and no UBSan vptr check, which objects of the
# uninstrumented LibTorch fail. libneva_sentencepiece never gets them: it is loaded into a link-map
# namespace without a sanitizer runtime.
set(NEVA_SANITIZE_FLAGS)
if(NEVA_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    message(FATAL_ERROR "NEVA_FUZZ needs clang for libFuzzer: configure with -DCMAKE_CXX_COMPILER=clang++ (scripts/fuzz.sh does)")
  endif()
  if(NOT NEVA_SANITIZE)
    set(NEVA_SANITIZE address,undefined)
  endif()
  list(APPEND NEVA_SANITIZE_FLAGS -fsanitize=fuzzer-no-link)
endif()
if(NEVA_SANITIZE)
  list(APPEND NEVA_SANITIZE_FLAGS -fsanitize=${NEVA_SANITIZE} -fno-sanitize-recover=all -fno-omit-frame-pointer)
  if(NEVA_SANITIZE MATCHES "undefined")
    list(APPEND NEVA_SANITIZE_FLAGS -fno-sanitize=vptr)
  endif()
endif()

# One precompiled header for every target (same flags everywhere, so it is built once).
add_library(neva_pch OBJECT ${PROJECT_SOURCE_DIR}/cmake/pch.cpp)
target_link_libraries(neva_pch PUBLIC neva_torch)
target_compile_options(neva_pch PRIVATE ${NEVA_WARNINGS} ${NEVA_SANITIZE_FLAGS})
target_precompile_headers(neva_pch PRIVATE
  <torch/nn/module.h> <torch/nn/modules/linear.h> <torch/nn/modules/activation.h>
  <torch/nn/modules/container/sequential.h> <ATen/ATen.h>
  <string> <vector> <memory> <map> <optional> <stdexcept>)

# neva_target_defaults(TARGET): warnings and the shared precompiled header.
function(neva_target_defaults target)
  target_compile_options(${target} PRIVATE ${NEVA_WARNINGS} ${NEVA_SANITIZE_FLAGS})
  target_link_options(${target} PRIVATE ${NEVA_SANITIZE_FLAGS})
  # Executables compile as -fPIC too (not -fPIE), so the one precompiled header fits them.
  get_target_property(type ${target} TYPE)
  if(type STREQUAL "EXECUTABLE")
    set_target_properties(${target} PROPERTIES POSITION_INDEPENDENT_CODE OFF)
    target_compile_options(${target} PRIVATE -fPIC)
  endif()
  target_precompile_headers(${target} REUSE_FROM neva_pch)
endfunction()
