# DC-AE kernels. CPU implementations always build; CUDA ones with DCGEN_WITH_CUDA.
list(APPEND DCGEN_SOURCES csrc/dcae/channel_rms_norm_cpu.cpp)
list(APPEND DCGEN_KERNELS channel_rms_norm:cpu)
if(DCGEN_WITH_CUDA)
  dcgen_cuda_sources(generic csrc/dcae/channel_rms_norm_cuda.cu csrc/dcae/linear_attention_cuda.cu)
  list(APPEND DCGEN_KERNELS channel_rms_norm:cuda relu_linear_attention:cuda)
endif()
