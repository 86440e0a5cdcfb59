"""Environment presets for GPU pods, kept in one place; the templates beside this file carry the
same values (a test checks they match, and that XLA accepts every flag).

Sources: JAX's "GPU performance tips" and NVIDIA JAX-Toolbox's "Tips for high-performance LLMs
with JAX and XLA". Every flag here exists in jaxlib 0.10.2 and later; an unknown flag makes XLA
abort at start-up, so the preset is checked in CI.
"""

H100_XLA_FLAGS = (
    # Overlap collectives with compute: the scheduler moves FSDP all-gathers/reduce-scatters
    # earlier/later, and the pipelined variants prefetch the next layer's weights inside the scan.
    "--xla_gpu_enable_latency_hiding_scheduler=true "
    "--xla_gpu_enable_pipelined_all_gather=true "
    "--xla_gpu_enable_pipelined_reduce_scatter=true "
    "--xla_gpu_enable_pipelined_all_reduce=true "
    "--xla_gpu_enable_while_loop_double_buffering=true "
    # Combine per-parameter collectives into large messages (1 GiB caps), one per layer.
    "--xla_gpu_all_reduce_combine_threshold_bytes=1073741824 "
    "--xla_gpu_all_gather_combine_threshold_bytes=1073741824 "
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=1073741824 "
    "--xla_gpu_enable_all_gather_combine_by_dim=false "
    "--xla_gpu_enable_reduce_scatter_combine_by_dim=false "
    # cuBLAS GEMMs (Triton GEMM autotuning is slower to compile and rarely faster for LLM shapes);
    # no XLA rematerialization pass: remat is chosen by model.remat.
    "--xla_gpu_enable_triton_gemm=false "
    "--xla_disable_hlo_passes=rematerialization"
)

H100_ENV = {
    "XLA_FLAGS": H100_XLA_FLAGS,
    # Leave ~10% of HBM to cuDNN/NCCL workspaces outside XLA's pool.
    "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90",
    # One hardware queue keeps the communication kernels in the order XLA scheduled them,
    # which the latency-hiding scheduler relies on (Hopper; not advised on Blackwell).
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
}
