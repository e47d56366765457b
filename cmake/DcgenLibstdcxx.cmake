# Link _C against the shared libstdc++ that torch runs with, never a static copy.
#
# Some toolchains' g++ links libstdc++ statically (the GPU machine's GCC in /opt/gcc did). A
# second copy of the iostream and locale code inside _C made every TORCH_CHECK that formats a
# number crash the process instead of raising (cmake/libstdcxx.py says how). Naming the shared
# library on the link line, ahead of the -lstdc++ the driver appends, resolves every std::
# symbol to it, so a static archive contributes nothing. A post-build check fails the build if
# the result still defines libstdc++'s own symbols (and removes it: dcgen then runs its references).

function(dcgen_link_shared_libstdcxx target)
  if(NOT CMAKE_SYSTEM_NAME STREQUAL "Linux" OR NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    return()
  endif()
  set(_helper "${CMAKE_CURRENT_SOURCE_DIR}/cmake/libstdcxx.py")
  execute_process(
    COMMAND "${Python_EXECUTABLE}" "${_helper}" find
    OUTPUT_VARIABLE _lib OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc)
  if(_rc EQUAL 0 AND _lib)
    message(STATUS "dcgen: linking the shared libstdc++ torch runs with: ${_lib}")
    target_link_libraries(${target} PRIVATE "${_lib}")
  else()
    message(STATUS "dcgen: no libstdc++ mapped by torch found; the driver's default is used")
  endif()
  add_custom_command(TARGET ${target} POST_BUILD
    COMMAND "${Python_EXECUTABLE}" "${_helper}" check --remove "$<TARGET_FILE:${target}>" "${CMAKE_NM}"
    VERBATIM)
endfunction()
