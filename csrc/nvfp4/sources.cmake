# Low-precision kernels: NVFP4 / FP8 activation quantization and GEMMs.
