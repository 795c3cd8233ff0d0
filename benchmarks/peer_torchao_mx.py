"""Peer side of the qdq-throughput protocol: torchao's MX / NVFP4 tensor emulation on the CPU.

Run it in torchao's own virtualenv (mixq is not needed there), on the same machine and day as
``qdq_throughput.py``; it measures its own copy baseline so that the ratios compare:

    python3 -m venv /tmp/peer-torchao
    /tmp/peer-torchao/bin/pip install torch==2.13.0 && /tmp/peer-torchao/bin/pip install torchao
    THP_MEM_ALLOC_ENABLE=1 /tmp/peer-torchao/bin/python benchmarks/peer_torchao_mx.py

Each case quantizes a 4096 x 4096 fp32 tensor and dequantizes it back to fp32 (a fake-quantize).
"""

import statistics
import time

import torch


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    import torchao
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor

    torch.set_num_threads(1)
    x = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    out = torch.empty_like(x)
    t_copy = timed(lambda: out.copy_(x), 10)
    cases = {
        "mxfp4": lambda: MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32).dequantize(torch.float32),
        "mxfp8_e4m3": lambda: MXTensor.to_mx(x, torch.float8_e4m3fn, 32).dequantize(torch.float32),
        "nvfp4": lambda: NVFP4Tensor.to_nvfp4(x, per_tensor_scale=x.abs().amax() / (6 * 448)).dequantize(
            torch.float32),
    }
    print(f"torchao {torchao.__version__}, torch {torch.__version__}, 1 thread; copy {t_copy * 1e3:.1f} ms")
    print("| torchao case | median (ms) | ratio to copy |")
    print("|---|---:|---:|")
    for name, fn in cases.items():
        t = timed(fn, 3)
        print(f"| {name} | {t * 1e3:.1f} | {t_copy / t:.4f} |")


if __name__ == "__main__":
    main()
