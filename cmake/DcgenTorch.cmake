# Finding torch.
#
# CUDA builds use torch's own CMake config (find_package(Torch)), which brings the CUDA
# libraries. That config refuses to work for a CUDA build of torch when no CUDA toolkit is
# installed ("Your installed Caffe2 version uses CUDA but I cannot find the CUDA libraries"),
# even for code that never touches CUDA; so C++-only builds describe torch by hand from its
# Python package (headers, libraries, C++ ABI), which works with any torch.

macro(dcgen_find_torch)
  if(DCGEN_WITH_CUDA)
    find_package(Torch REQUIRED)
  else()
    execute_process(
      COMMAND "${Python_EXECUTABLE}" -c
        "import os, torch; p = os.path.dirname(torch.__file__); print(';'.join([os.path.join(p, 'include'), os.path.join(p, 'include', 'torch', 'csrc', 'api', 'include')])); print(os.path.join(p, 'lib')); print(int(torch.compiled_with_cxx11_abi())); print(torch.__version__.split('+')[0])"
      OUTPUT_VARIABLE _torch_facts OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc)
    if(NOT _rc EQUAL 0)
      message(FATAL_ERROR "dcgen: could not import torch with ${Python_EXECUTABLE}")
    endif()
    string(REPLACE "\n" "|" _torch_facts "${_torch_facts}")
    string(REPLACE "|" ";" _torch_list "${_torch_facts}")
    # _torch_list: include dir 1; include dir 2; lib dir; abi; version
    list(GET _torch_list 0 _inc0)
    list(GET _torch_list 1 _inc1)
    list(GET _torch_list 2 _libdir)
    list(GET _torch_list 3 _abi)
    list(GET _torch_list 4 Torch_VERSION)
    add_library(dcgen_torch INTERFACE)
    target_include_directories(dcgen_torch INTERFACE "${_inc0}" "${_inc1}")
    target_compile_definitions(dcgen_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${_abi})
    foreach(lib c10 torch torch_cpu)
      find_library(DCGEN_LIB_${lib} NAMES ${lib} PATHS "${_libdir}" NO_DEFAULT_PATH REQUIRED)
      target_link_libraries(dcgen_torch INTERFACE "${DCGEN_LIB_${lib}}")
    endforeach()
    set(TORCH_LIBRARIES dcgen_torch)
    message(STATUS "dcgen: C++-only build against torch ${Torch_VERSION} at ${_libdir}")
  endif()
endmacro()
