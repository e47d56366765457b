# DC-AE kernels. CPU implementations always build; CUDA ones with DCGEN_WITH_CUDA.
list(APPEND DCGEN_SOURCES csrc/dcae/channel_rms_norm_cpu.cpp)
list(APPEND DCGEN_KERNELS channel_rms_norm:cpu channel_rms_norm_fused:cpu channel_rms_norm_fused_out:cpu)
if(DCGEN_WITH_CUDA)
  dcgen_cuda_sources(generic csrc/dcae/channel_rms_norm_cuda.cu csrc/dcae/linear_attention_cuda.cu
                     csrc/dcae/block_shortcuts_cuda.cu csrc/dcae/glu_depthwise_cuda.cu
                     csrc/dcae/bias_act_cuda.cu)
  list(APPEND DCGEN_KERNELS channel_rms_norm:cuda channel_rms_norm_fused:cuda channel_rms_norm_fused_out:cuda relu_linear_attention:cuda
       up_block_shortcut:cuda up_block_shortcut_out:cuda down_block_shortcut:cuda glu_depthwise_conv:cuda
       bias_act_:cuda)
endif()
