"""GPU data-sheet figures the planner needs, one named constant per number, with its source.

All bandwidths are per GPU and per direction, in bytes/s; FLOP/s are dense (no 2:4 sparsity).
"Node" means the 8-GPU NVLink domain of an HGX/DGX board; inter-node traffic leaves through the
GPU's own NIC (DGX/HGX H100, H200 and B200 pair each GPU with one 400 Gb/s ConnectX-7 port).
"""

from __future__ import annotations

import dataclasses

from mai_jax.config import GPU_TYPES
from mai_jax.metrics import PEAK_BF16_FLOPS

# NVIDIA H100 Tensor Core GPU datasheet (SXM5 column): FP8 3,958 TFLOPS and BF16 1,979 TFLOPS
# "with sparsity" (dense is half), 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s (bidirectional total
# over 18 NVLink-4 links, so 450 GB/s each way).
H100_PEAK_FP8_FLOPS = 1978.9e12
H100_HBM_BYTES = 80 * 10**9
H100_HBM_BANDWIDTH = 3.35e12
H100_NVLINK_BANDWIDTH = 450e9
# NVIDIA H200 Tensor Core GPU datasheet (SXM column): same compute as H100 SXM, 141 GB HBM3e at
# 4.8 TB/s, NVLink 900 GB/s.
H200_PEAK_FP8_FLOPS = 1978.9e12
H200_HBM_BYTES = 141 * 10**9
H200_HBM_BANDWIDTH = 4.8e12
H200_NVLINK_BANDWIDTH = 450e9
# NVIDIA H800: the export variant of the H100 SXM5 with the same tensor-core compute, 80 GB HBM3 at
# 3.35 TB/s, and NVLink cut to 400 GB/s (NVIDIA H800 product listing; bidirectional total like the
# H100's 900, so 200 GB/s each way). DeepSeek-V3 (arXiv:2412.19437, sec. 3.2.2) measures 160 GB/s of
# NVLink ("roughly 3.2 times that of IB (50 GB/s)") on its H800 nodes: 0.8 x 200, the planner's
# COLLECTIVE_EFFICIENCY. The IB figure, 50 GB/s per GPU, is one 400 Gb/s NIC per GPU as below.
H800_PEAK_FP8_FLOPS = H100_PEAK_FP8_FLOPS
H800_HBM_BYTES = H100_HBM_BYTES
H800_HBM_BANDWIDTH = H100_HBM_BANDWIDTH
H800_NVLINK_BANDWIDTH = 200e9
# NVIDIA DGX B200 datasheet: 72 PFLOPS FP8 training / 8 GPUs = 9 PFLOPS sparse, 4.5 dense per GPU
# (BF16 2.25 dense), 1,440 GB HBM3e / 8 = 180 GB at 8 TB/s per GPU (HGX B200 spec), fifth-
# generation NVLink 1.8 TB/s per GPU (900 GB/s each way).
B200_PEAK_FP8_FLOPS = 4500e12
B200_HBM_BYTES = 180 * 10**9
B200_HBM_BANDWIDTH = 8.0e12
B200_NVLINK_BANDWIDTH = 900e9
# DGX H100 / DGX H200 / DGX B200 datasheets: 8x single-port ConnectX-7 at 400 Gb/s InfiniBand NDR
# for the compute fabric, one per GPU: 50 GB/s each way per GPU.
CONNECTX7_NDR_BANDWIDTH = 400e9 / 8
GPUS_PER_NODE = 8


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  name: str
  peak_bf16_flops: float
  peak_fp8_flops: float
  hbm_bytes: int
  hbm_bandwidth: float
  nvlink_bandwidth: float  # intra-node, per GPU, each way
  internode_bandwidth: float  # per GPU, each way
  gpus_per_node: int = GPUS_PER_NODE


GPUS = {
    "h100": GpuSpec("H100 SXM5 80GB", PEAK_BF16_FLOPS["H100"], H100_PEAK_FP8_FLOPS,
                    H100_HBM_BYTES, H100_HBM_BANDWIDTH, H100_NVLINK_BANDWIDTH,
                    CONNECTX7_NDR_BANDWIDTH),
    "h200": GpuSpec("H200 SXM 141GB", PEAK_BF16_FLOPS["H200"], H200_PEAK_FP8_FLOPS,
                    H200_HBM_BYTES, H200_HBM_BANDWIDTH, H200_NVLINK_BANDWIDTH,
                    CONNECTX7_NDR_BANDWIDTH),
    "h800": GpuSpec("H800 SXM5 80GB", PEAK_BF16_FLOPS["H800"], H800_PEAK_FP8_FLOPS,
                    H800_HBM_BYTES, H800_HBM_BANDWIDTH, H800_NVLINK_BANDWIDTH,
                    CONNECTX7_NDR_BANDWIDTH),
    "b200": GpuSpec("B200 180GB", PEAK_BF16_FLOPS["B200"], B200_PEAK_FP8_FLOPS, B200_HBM_BYTES,
                    B200_HBM_BANDWIDTH, B200_NVLINK_BANDWIDTH, CONNECTX7_NDR_BANDWIDTH),
}
assert tuple(GPUS) == GPU_TYPES, "mai_jax.config.GPU_TYPES and hardware.GPUS must agree"
