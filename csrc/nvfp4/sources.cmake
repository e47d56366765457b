# Low-precision kernels: NVFP4 / FP8 activation quantization (GEMMs: see dcgen/quant).
# The op schemas build everywhere (C++-only included); the kernels with DCGEN_WITH_CUDA.
list(APPEND DCGEN_SOURCES csrc/nvfp4/schemas.cpp)
if(DCGEN_WITH_CUDA)
  dcgen_cuda_sources(generic csrc/nvfp4/quantize_fp8_cuda.cu csrc/nvfp4/quantize_nvfp4_cuda.cu)
  list(APPEND DCGEN_KERNELS quantize_fp8:cuda quantize_nvfp4:cuda)
endif()
