# Fused DiT attention kernels (QK-RMSNorm + RoPE prologue, flash attention forward).
# Schemas always build (the C++-only build registers the ops; Python runs the references).
list(APPEND DCGEN_SOURCES csrc/attention/schemas.cpp)
if(DCGEN_WITH_CUDA)
  # Portable mma.sync flash forward: one dtype x head-dim configuration per file (compile time
  # on small machines), plus the torch-facing wrappers.
  dcgen_cuda_sources(generic
    csrc/attention/qk_norm_rope_cuda.cu
    csrc/attention/flash_fwd_bf16_d64.cu
    csrc/attention/flash_fwd_bf16_d128.cu
    csrc/attention/flash_fwd_fp16_d64.cu
    csrc/attention/flash_fwd_fp16_d128.cu)
  # The attention wrapper launches no kernel itself (each configuration's file does): host C++,
  # which spares nvcc's two device passes and cudafe++ over torch's headers (about a minute of
  # a cold build on 2 cores).
  set_source_files_properties(csrc/attention/flash_attention_cuda.cpp PROPERTIES
    INCLUDE_DIRECTORIES "${CMAKE_CUDA_TOOLKIT_INCLUDE_DIRECTORIES}")
  list(APPEND DCGEN_SOURCES csrc/attention/flash_attention_cuda.cpp)
  list(APPEND DCGEN_KERNELS qk_norm_rope:cuda fused_attention:cuda)
  # Hopper flash forwards (CuTe wgmma, sm_90a only; 35-55 s per file on 2 cores): need the
  # CUTLASS/CuTe headers; the wrapper picks one on sm_90 by DCGEN_ATTENTION_SM90.
  if(DCGEN_CUTLASS_INCLUDE)
    dcgen_cuda_sources(hopper
      csrc/attention/flash_fwd_sm90_bf16_d64.cu
      csrc/attention/flash_fwd_sm90_bf16_d128.cu
      csrc/attention/flash_fwd_sm90_fp16_d64.cu
      csrc/attention/flash_fwd_sm90_fp16_d128.cu
      csrc/attention/flash_fwd_sm90_tma_bf16_d64.cu
      csrc/attention/flash_fwd_sm90_tma_bf16_d128.cu
      csrc/attention/flash_fwd_sm90_tma_fp16_d64.cu
      csrc/attention/flash_fwd_sm90_tma_fp16_d128.cu)
    set_property(SOURCE csrc/attention/flash_attention_cuda.cpp APPEND PROPERTY
      COMPILE_DEFINITIONS DCGEN_ATTENTION_SM90=1)
  endif()
endif()
