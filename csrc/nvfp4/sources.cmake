# Low-precision kernels: NVFP4 / FP8 activation quantization and the Blackwell NVFP4 GEMM.
# The op schemas build everywhere (C++-only included); the kernels with DCGEN_WITH_CUDA.
list(APPEND DCGEN_SOURCES csrc/nvfp4/schemas.cpp)
if(DCGEN_WITH_CUDA)
  dcgen_cuda_sources(generic csrc/nvfp4/quantize_fp8_cuda.cu csrc/nvfp4/quantize_nvfp4_cuda.cu
    csrc/nvfp4/nvfp4_dequantize_cuda.cu csrc/nvfp4/fp8_epilogue_cuda.cu
    csrc/nvfp4/quantize_nvfp4_lowrank_cuda.cu)
  list(APPEND DCGEN_KERNELS quantize_fp8:cuda quantize_nvfp4:cuda nvfp4_dequantize:cuda
    fp8_scale_epilogue:cuda fp8_scale_epilogue_into:cuda
    fp8_scale_epilogue_fp8:cuda quantize_nvfp4_lowrank:cuda)
  # CUTLASS block-scaled GEMM: an Sm100 kernel builds for sm_100a only (the "blackwell" family
  # adds sm_120a, whose block-scaled MMA is a different instruction set). About 3.5 min and
  # 4 GB of RAM on 2 shared cores. 2908: CUTLASS headers' implicit `this` captures (C++20).
  if(DCGEN_CUTLASS_INCLUDE)
    set_source_files_properties(csrc/nvfp4/nvfp4_gemm_cuda.cpp PROPERTIES
      INCLUDE_DIRECTORIES "${CMAKE_CUDA_TOOLKIT_INCLUDE_DIRECTORIES}")
    list(APPEND DCGEN_SOURCES csrc/nvfp4/nvfp4_gemm_cuda.cpp)
    if(DCGEN_BLACKWELL)
      set_source_files_properties(csrc/nvfp4/nvfp4_gemm_sm100.cu PROPERTIES COMPILE_OPTIONS
        "-DNDEBUG;-O3;-lineinfo;-gencode=arch=compute_100a,code=sm_100a;-diag-suppress=2908")
      # GeForce Blackwell: the Sm120 block-scaled collective, its own file, sm_120a only.
      set_source_files_properties(csrc/nvfp4/nvfp4_gemm_sm120.cu PROPERTIES COMPILE_OPTIONS
        "-DNDEBUG;-O3;-lineinfo;-gencode=arch=compute_120a,code=sm_120a;-diag-suppress=2908")
      list(APPEND DCGEN_SOURCES csrc/nvfp4/nvfp4_gemm_sm100.cu csrc/nvfp4/nvfp4_gemm_sm120.cu)
      list(APPEND DCGEN_ALL_ARCHS sm_100a sm_120a)
      list(REMOVE_DUPLICATES DCGEN_ALL_ARCHS)
    else()
      # The binding then refuses sm_100 / sm_120 with a clear error instead of a link failure.
      set_property(SOURCE csrc/nvfp4/nvfp4_gemm_cuda.cpp APPEND PROPERTY
        COMPILE_DEFINITIONS DCGEN_NO_BLACKWELL_GEMM=1)
    endif()
    # Hopper: CuTe wgmma GEMMs that dequantize NVFP4 in the mainloop, sm_90a only, one kernel
    # per file (about 25-40 s each on 2 cores): the register-operand kernel (default for both
    # ops) and the first kernel's W4A4 and W4A16 forms (DCGEN_NVFP4_SM90_KERNEL=mainloop).
    dcgen_cuda_sources(hopper csrc/nvfp4/nvfp4_gemm_rs_sm90.cu csrc/nvfp4/nvfp4_gemm_sm90.cu
      csrc/nvfp4/nvfp4_gemm_w4a16_sm90.cu)
    list(APPEND DCGEN_KERNELS nvfp4_gemm:cuda nvfp4_gemm_w4a16:cuda)
  endif()
endif()
