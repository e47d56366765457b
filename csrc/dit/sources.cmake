# DiT block glue: AdaLN modulation and gated residual. Schemas always; kernels with CUDA.
list(APPEND DCGEN_SOURCES csrc/dit/schemas.cpp)
if(DCGEN_WITH_CUDA)
  dcgen_cuda_sources(generic csrc/dit/modulation_cuda.cu)
  list(APPEND DCGEN_KERNELS adaln_modulate:cuda gated_residual:cuda adaln_modulate_fp8:cuda)
endif()
