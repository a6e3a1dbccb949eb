"""Figures for machines one does not have: GPU and CPU presets, and the links between nodes.

Datasheet peaks times the fraction large kernels achieve in practice, with their sources at each figure;
`Hardware.preset(name)` builds one, `parse_link` reads a link between nodes by name or line rate.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from elixir.hardware.record import Hardware

GiB = 2**30

# Achieved fractions used throughout (peaks are from the datasheets cited at each figure):
_MATMUL_ACHIEVED = 0.65  # large bf16/fp16 GEMMs in training reach ~60-70% of the tensor-core peak
_FP32_ACHIEVED = 0.85  # strict-FP32 SIMT GEMMs run close to the CUDA-core peak
_HBM_ACHIEVED = 0.8  # streaming kernels reach ~80% of the memory bandwidth
# A fused AdamW step streams ~32 bytes per element: reads fp32 grad, param, exp_avg, exp_avg_sq (16 B), writes
# param, exp_avg, exp_avg_sq (12 B) and the compute-dtype copy of the param (2 B), rounded up.
_ADAM_BYTES_PER_ELEM = 32
_PCIE4_ACHIEVED = 25e9  # PCIe 4.0 x16: 31.5 GB/s per direction; ~25 GB/s pinned (CUDA bandwidthTest)
_PCIE5_ACHIEVED = 50e9  # PCIe 5.0 x16: 63 GB/s per direction; ~50 GB/s pinned (CUDA bandwidthTest)
# Host-side AdamW for one rank of an 8-GPU server: two sockets of 8-channel DDR4-3200 (2 x 204.8 GB/s) or
# DDR5-4800 (2 x 307 GB/s) at ~60% achieved, shared by 8 ranks, / 32 B per element. ZeRO-Offload reports
# CPU-Adam around 1e9 parameters/s on such servers, which agrees.
_HOST_ADAM_DDR4 = 2 * 204.8e9 * 0.6 / 8 / _ADAM_BYTES_PER_ELEM  # ~0.96e9
_HOST_ADAM_DDR5 = 2 * 307.2e9 * 0.6 / 8 / _ADAM_BYTES_PER_ELEM  # ~1.4e9
# Scratch NVMe per rank, as (bytes, read B/s, write B/s) at ~90% of the drives' sequential datasheet figures.
# DGX A100: 4 x 3.84 TB U.2 Gen4 drives (Samsung PM1733 datasheet: 7,000 MB/s read, 3,800 MB/s write) for 8
# GPUs. DGX H100/H200: 8 x 3.84 TB U.2 Gen4 drives, one per GPU. A workstation: one 2 TB PCIe 4.0 M.2 drive
# (Samsung 990 PRO datasheet: 7,450 MB/s read, 6,900 MB/s write) for its 4 GPUs.
_NVME_DGX_A100 = (4 * 3840 * 10**9 // 8, 0.9 * 4 * 7.0e9 / 8, 0.9 * 4 * 3.8e9 / 8)
_NVME_DGX_H100 = (3840 * 10**9, 0.9 * 7.0e9, 0.9 * 3.8e9)
_NVME_WORKSTATION = (2000 * 10**9 // 4, 0.9 * 7.45e9 / 4, 0.9 * 6.9e9 / 4)


# Links between nodes, one NIC each, as (bytes/s that NCCL collectives achieve, latency of one ring step).
# InfiniBand HDR (200 Gb/s = 25 GB/s) and NDR (400 Gb/s): nccl-tests reach ~90% of the line rate across nodes
# with GPUDirect RDMA, ~3 us per step. RoCE v2 at 200 Gb/s: ~85%, ~5 us. Ethernet without RDMA (NCCL's socket
# transport over TCP): ~70% of the line rate, ~25 us per step. `parse_link` reads these names, "4x<name>" for
# four NICs per node, or a plain line rate ("100Gbps", "4x200Gbps", taken at 80% and 10 us).
INTER_NODE_LINKS: dict[str, tuple[float, float]] = {
    "ethernet-100g": (0.70 * 100e9 / 8, 25e-6),
    "ethernet-200g": (0.70 * 200e9 / 8, 25e-6),
    "roce-100g": (0.85 * 100e9 / 8, 5e-6),
    "roce-200g": (0.85 * 200e9 / 8, 5e-6),
    "ib-hdr-200g": (0.90 * 200e9 / 8, 3e-6),
    "ib-ndr-400g": (0.90 * 400e9 / 8, 3e-6),
}
_LINE_RATE_ACHIEVED, _LINE_RATE_LATENCY_S = 0.8, 10e-6
_LINK = re.compile(r"^\s*(?:([0-9]+)\s*[xX]\s*)?(.+?)\s*$")
_LINE_RATE = re.compile(r"^([0-9]+(?:\.[0-9]*)?)\s*[Gg](?:bps|b/s|bit/s|bE|be)$")  # gigabits: a lower-case b


def parse_link(text: str) -> tuple[float, float]:
    """(bytes/s, latency s) of a node's links to the other nodes: "ib-hdr-200g", "4xib-hdr-200g" (four NICs),
    or a line rate in gigabits per second, "100Gbps", "100GbE", "4x200Gbps" (80% of it achieved).
    ValueError naming the text and what is accepted."""
    m = _LINK.match(str(text))
    count = int(m.group(1)) if m and m.group(1) else 1
    body = m.group(2) if m else ""
    if count >= 1 and body.lower() in INTER_NODE_LINKS:
        rate, latency = INTER_NODE_LINKS[body.lower()]
        return count * rate, latency
    line = _LINE_RATE.match(body)
    if count >= 1 and line and float(line.group(1)) > 0:
        return count * float(line.group(1)) * 1e9 / 8 * _LINE_RATE_ACHIEVED, _LINE_RATE_LATENCY_S
    raise ValueError(
        f"inter-node link {text!r}: give a node's line rate in gigabits per second (\"100Gbps\", \"4x200Gbps\" "
        f"for four NICs) or a link name ({', '.join(INTER_NODE_LINKS)}), optionally with \"4x\" before it"
    )


def _gpu(
    name: str,
    *,
    device_bytes: int,
    host_bytes: int,
    bf16_peak: float,
    fp32_peak: float,
    hbm_bytes_per_s: float,
    pcie: float,
    collective: dict[int, float],
    host_adam: float,
    disk: tuple[int, float, float] = (0, 0.0, 0.0),
) -> Callable[[], Hardware]:
    return lambda: Hardware(
        name=name,
        disk_bytes=disk[0],
        disk_read_bytes_per_s=disk[1],
        disk_write_bytes_per_s=disk[2],
        device_bytes=device_bytes,
        host_bytes=host_bytes,
        matmul_flops={
            "float32": fp32_peak * _FP32_ACHIEVED,
            "bfloat16": bf16_peak * _MATMUL_ACHIEVED,
            "float16": bf16_peak * _MATMUL_ACHIEVED,
        },
        h2d_bytes_per_s=pcie,
        d2h_bytes_per_s=pcie,
        collective_bytes_per_s=dict(collective),
        device_optim_elems_per_s=hbm_bytes_per_s * _HBM_ACHIEVED / _ADAM_BYTES_PER_ELEM,
        host_optim_elems_per_s=host_adam,
        # a copy reads and writes every byte: half the bandwidth
        device_copy_bytes_per_s=hbm_bytes_per_s * _HBM_ACHIEVED / 2,
    )


_PRESETS: dict[str, Callable[[], Hardware]] = {
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4): BF16/FP16 dense 312 TFLOPS, FP32 19.5 TFLOPS, HBM2 1,555 GB/s,
    # NVLink 3 600 GB/s (300 GB/s per direction), PCIe 4.0. nvidia-smi memory.total 40960 MiB.
    # Host: DGX A100 (320 GB) has 1 TB of RAM for 8 GPUs. Collectives: nccl-tests all_gather/reduce_scatter on
    # NVSwitch reach ~230 GB/s bus bandwidth of the 300 GB/s; across nodes one 200 Gb/s HDR NIC per GPU
    # (25 GB/s) gives ~20 GB/s.
    "A100-40GB": _gpu(
        "A100-40GB",
        device_bytes=40960 * 2**20,
        host_bytes=1024 * GiB // 8,
        bf16_peak=312e12,
        fp32_peak=19.5e12,
        hbm_bytes_per_s=1555e9,
        pcie=_PCIE4_ACHIEVED,
        collective={2: 230e9, 4: 230e9, 8: 230e9, 16: 20e9},
        host_adam=_HOST_ADAM_DDR4,
        disk=_NVME_DGX_A100,
    ),
    # Same datasheet, A100 80GB SXM4: HBM2e 2,039 GB/s; nvidia-smi memory.total 81920 MiB. DGX A100 (640 GB)
    # has 2 TB of RAM for 8 GPUs.
    "A100-80GB": _gpu(
        "A100-80GB",
        device_bytes=81920 * 2**20,
        host_bytes=2048 * GiB // 8,
        bf16_peak=312e12,
        fp32_peak=19.5e12,
        hbm_bytes_per_s=2039e9,
        pcie=_PCIE4_ACHIEVED,
        collective={2: 230e9, 4: 230e9, 8: 230e9, 16: 20e9},
        host_adam=_HOST_ADAM_DDR4,
        disk=_NVME_DGX_A100,
    ),
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16/FP16 dense 989 TFLOPS (1,979 with sparsity), FP32
    # 67 TFLOPS, HBM3 3.35 TB/s, NVLink 4 900 GB/s (450 per direction), PCIe 5.0. nvidia-smi memory.total
    # 81559 MiB. DGX H100 has 2 TB of RAM for 8 GPUs. nccl-tests on NVSwitch: ~360 GB/s bus bandwidth; across
    # nodes one 400 Gb/s NDR NIC per GPU (50 GB/s) gives ~40 GB/s.
    "H100-80GB": _gpu(
        "H100-80GB",
        device_bytes=81559 * 2**20,
        host_bytes=2048 * GiB // 8,
        bf16_peak=989e12,
        fp32_peak=67e12,
        hbm_bytes_per_s=3350e9,
        pcie=_PCIE5_ACHIEVED,
        collective={2: 360e9, 4: 360e9, 8: 360e9, 16: 40e9},
        host_adam=_HOST_ADAM_DDR5,
        disk=_NVME_DGX_H100,
    ),
    # NVIDIA H200 Tensor Core GPU product brief (SXM): the H100's compute (BF16 dense 989 TFLOPS, FP32
    # 67 TFLOPS) with 141 GB HBM3e at 4.8 TB/s, NVLink 4 900 GB/s, PCIe 5.0. nvidia-smi memory.total
    # 143771 MiB. DGX H200 has 2 TB of RAM for 8 GPUs; collectives as DGX H100.
    "H200": _gpu(
        "H200",
        device_bytes=143771 * 2**20,
        host_bytes=2048 * GiB // 8,
        bf16_peak=989e12,
        fp32_peak=67e12,
        hbm_bytes_per_s=4800e9,
        pcie=_PCIE5_ACHIEVED,
        collective={2: 360e9, 4: 360e9, 8: 360e9, 16: 40e9},
        host_adam=_HOST_ADAM_DDR5,
        disk=_NVME_DGX_H100,
    ),
    # NVIDIA Ada GPU architecture whitepaper, appendix A (GeForce RTX 4090): FP16/BF16 tensor with FP32
    # accumulate 165.2 TFLOPS dense (330 only with FP16 accumulate, which PyTorch does not use), FP32
    # 82.6 TFLOPS, GDDR6X 1,008 GB/s, PCIe 4.0, no NVLink and no P2P on GeForce. nvidia-smi memory.total
    # 24564 MiB. Host: a 4-GPU workstation with 256 GB of DDR5 (2 x 4 channels at 4800 MT/s, ~60% achieved).
    # Collectives go through host memory over PCIe: nccl-tests reports ~10 GB/s bus bandwidth for 2 GPUs,
    # less as more GPUs share the root complex.
    "RTX4090": _gpu(
        "RTX4090",
        device_bytes=24564 * 2**20,
        host_bytes=256 * GiB // 4,
        bf16_peak=165.2e12,
        fp32_peak=82.6e12,
        hbm_bytes_per_s=1008e9,
        pcie=_PCIE4_ACHIEVED,
        collective={2: 10e9, 4: 7e9, 8: 5e9},
        host_adam=8 * 38.4e9 * 0.6 / 4 / _ADAM_BYTES_PER_ELEM,
        disk=_NVME_WORKSTATION,
    ),
    # A CPU-only server socket: 32 Zen 4 cores at ~3 GHz, AVX-512 on 2 x 256-bit pipes: 32 FP32 FLOP/cycle/core,
    # 3.1 TFLOPS peak, ~60% in oneDNN SGEMM; AVX512-BF16 doubles that for bfloat16; no fast float16 GEMM
    # (absent). 12 channels of DDR5-4800 (460 GB/s, ~60% achieved), 384 GB of RAM split between "device" and
    # "host" (the same RAM, see the docstring of elixir/hardware/__init__.py). No collectives: one process.
    "CPU": lambda: Hardware(
        name="CPU",
        device_type="cpu",
        device_bytes=192 * GiB,
        host_bytes=192 * GiB,
        matmul_flops={"float32": 0.6 * 3.1e12, "bfloat16": 0.6 * 6.2e12},
        h2d_bytes_per_s=460e9 * 0.6 / 2,
        d2h_bytes_per_s=460e9 * 0.6 / 2,
        collective_bytes_per_s={},
        device_optim_elems_per_s=460e9 * 0.6 / _ADAM_BYTES_PER_ELEM,
        host_optim_elems_per_s=460e9 * 0.6 / _ADAM_BYTES_PER_ELEM,
        device_copy_bytes_per_s=460e9 * 0.6 / 2,
    ),
}

