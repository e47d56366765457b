# CUDA policy for dcgen: every .cu file gets only the archs its family needs.
#
#   generic   portable kernels: real sm_80 and sm_90 code + compute_90 PTX (JIT on newer cards)
#   hopper    sm_90a (wgmma, TMA)
#   blackwell sm_100a and sm_120a (block-scaled MMA); only files that need Blackwell
#
# torch's CMake config appends -gencode flags for about ten archs to CMAKE_CUDA_FLAGS (it ignores
# CMAKE_CUDA_ARCHITECTURES); dcgen_strip_torch_gencode() removes them after find_package(Torch)
# so each file compiles for its own list only. DCGEN_CUDA_ARCHS ("80;90") overrides the generic
# list, e.g. to build for just the card at hand.

set(DCGEN_CUDA_ARCHS "80;90" CACHE STRING "Real archs for the generic kernels")

macro(dcgen_enable_cuda)
  # Keep torch's arch detection quiet and cheap; its flags are stripped afterwards anyway.
  if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    set(ENV{TORCH_CUDA_ARCH_LIST} "9.0")
  endif()
  enable_language(CUDA)
  # Archs are chosen per file (dcgen_cuda_sources); torch warns when this variable is defined.
  unset(CMAKE_CUDA_ARCHITECTURES)
  unset(CMAKE_CUDA_ARCHITECTURES CACHE)
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  if(NOT CUDA_TOOLKIT_ROOT_DIR)
    get_filename_component(_nvcc_bin "${CMAKE_CUDA_COMPILER}" DIRECTORY)
    get_filename_component(CUDA_TOOLKIT_ROOT_DIR "${_nvcc_bin}" DIRECTORY)
  endif()
  add_compile_definitions(DCGEN_WITH_CUDA=1)
  set(DCGEN_WITH_CUDA_INT 1)
  set(DCGEN_ALL_ARCHS "")
endmacro()

macro(dcgen_strip_torch_gencode)
  string(REGEX REPLACE "-gencode[ =]+arch=[^ ]+" "" CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS}")
  string(REGEX REPLACE "  +" " " CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS}")
endmacro()

# dcgen_cuda_sources(<family> <files...>): add files to DCGEN_SOURCES with their arch flags.
function(dcgen_cuda_sources family)
  set(flags -DNDEBUG -O3 -lineinfo)
  set(archs "")
  if(family STREQUAL "generic")
    foreach(a IN LISTS DCGEN_CUDA_ARCHS)
      list(APPEND flags "-gencode=arch=compute_${a},code=sm_${a}")
      list(APPEND archs "sm_${a}")
    endforeach()
    list(GET DCGEN_CUDA_ARCHS -1 ptx)
    list(APPEND flags "-gencode=arch=compute_${ptx},code=compute_${ptx}")
    list(APPEND archs "compute_${ptx}")
  elseif(family STREQUAL "hopper")
    list(APPEND flags "-gencode=arch=compute_90a,code=sm_90a")
    list(APPEND archs "sm_90a")
  elseif(family STREQUAL "blackwell")
    list(APPEND flags "-gencode=arch=compute_100a,code=sm_100a"
                      "-gencode=arch=compute_120a,code=sm_120a")
    list(APPEND archs "sm_100a" "sm_120a")
  else()
    message(FATAL_ERROR "dcgen_cuda_sources: unknown family '${family}'")
  endif()
  foreach(src IN LISTS ARGN)
    set_source_files_properties(${src} PROPERTIES COMPILE_OPTIONS "${flags}")
  endforeach()
  set(all ${DCGEN_ALL_ARCHS} ${archs})
  list(REMOVE_DUPLICATES all)
  set(DCGEN_ALL_ARCHS "${all}" PARENT_SCOPE)
  set(DCGEN_SOURCES ${DCGEN_SOURCES} ${ARGN} PARENT_SCOPE)
endfunction()
