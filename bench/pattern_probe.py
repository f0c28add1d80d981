"""Probe: how fast can a bf16 -> fp32 (or bf16) stream move with the forward's access pattern? (GPU)

    python bench/pattern_probe.py [--shapes 4,64,8192 ...]

No recurrence math: each kernel only converts x [rows, L] into y, so the time is the memory system's
answer to the access pattern alone. Two patterns, at several tiles in flight and warps per CTA:
- ``chan``: the generated kernels' mapping. A warp owns 16 rows (channels); a lane pair reads one row's
  16-token tile (32 bytes of bf16), ``F`` tiles per batch, 64 tiles per warp.
- ``tok``: one warp per row segment; a load instruction reads 256 consecutive tokens (512 bytes),
  ``F`` of them per batch, 8 instructions (2048 tokens) per warp.
Beside them, torch's own cast (``x.float()``), a bf16 clone and the 1 GiB copy bandwidth.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_swr import bench_ms, copy_bandwidth
from swrgen.compiler.nvrtc import compile_cubin
from swrgen.runtime.driver import Module, ensure_context

SOURCE = r"""
#include <cuda_bf16.h>
template <int F, typename O> struct Conv;
__device__ __forceinline__ void widen(uint4 q, float* f) {
  const unsigned w[4] = {q.x, q.y, q.z, q.w};
  for (int j = 0; j < 4; ++j) {
    f[2 * j] = __uint_as_float(w[j] << 16);
    f[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
  }
}
// Store 8 converted values (fp32: two 16-byte stores; bf16: the 16 bytes as loaded).
__device__ __forceinline__ void put(float* y, uint4 q) {
  float f[8]; widen(q, f);
  reinterpret_cast<float4*>(y)[0] = make_float4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<float4*>(y)[1] = make_float4(f[4], f[5], f[6], f[7]);
}
__device__ __forceinline__ void put(__nv_bfloat16* y, uint4 q) { *reinterpret_cast<uint4*>(y) = q; }
__device__ __forceinline__ uint4 ld(const __nv_bfloat16* p) {
  uint4 v;
  asm volatile("ld.global.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
}
// chan: warp = 16 rows x 64 tiles; lane = 2 * row + half.
template <int F, typename O>
__device__ __forceinline__ void chan(const __nv_bfloat16* x, O* y, long long rows, long long len) {
  const int lane = threadIdx.x % 32;
  const long long warp = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const long long chunks = len / (16 * 64);
  const long long group = warp / chunks, chunk = warp % chunks;
  if (group * 16 >= rows) return;
  const long long row = group * 16 + lane / 2;
  const long long base = row * len + chunk * 64 * 16 + (lane & 1) * 8;
  for (int t = 0; t < 64; t += F) {
    uint4 q[F];
#pragma unroll
    for (int f = 0; f < F; ++f) q[f] = ld(x + base + (t + f) * 16);
#pragma unroll
    for (int f = 0; f < F; ++f) put(y + base + (t + f) * 16, q[f]);
  }
}
// tok: warp = one row x 8 segments of 256 tokens; lane holds 8 consecutive tokens.
template <int F, typename O>
__device__ __forceinline__ void tok(const __nv_bfloat16* x, O* y, long long rows, long long len) {
  const int lane = threadIdx.x % 32;
  const long long warp = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const long long chunks = len / (256 * 8);
  const long long row = warp / chunks, chunk = warp % chunks;
  if (row >= rows) return;
  const long long base = row * len + chunk * 8 * 256 + lane * 8;
  for (int s = 0; s < 8; s += F) {
    uint4 q[F];
#pragma unroll
    for (int f = 0; f < F; ++f) q[f] = ld(x + base + (s + f) * 256);
#pragma unroll
    for (int f = 0; f < F; ++f) put(y + base + (s + f) * 256, q[f]);
  }
}
#define K(P, F, O, N) \
  extern "C" __global__ void P##_##N##_f##F(const __nv_bfloat16* x, O* y, long long r, long long l) { \
    P<F, O>(x, y, r, l);                                                                              \
  }
K(chan, 2, float, fp32) K(chan, 4, float, fp32) K(chan, 8, float, fp32) K(chan, 16, float, fp32)
K(tok, 2, float, fp32) K(tok, 4, float, fp32) K(tok, 8, float, fp32)
K(chan, 4, __nv_bfloat16, bf16) K(chan, 8, __nv_bfloat16, bf16) K(chan, 16, __nv_bfloat16, bf16)
K(tok, 2, __nv_bfloat16, bf16) K(tok, 4, __nv_bfloat16, bf16) K(tok, 8, __nv_bfloat16, bf16)
"""


def names() -> list[str]:
    out = []
    out += [f"chan_fp32_f{f}" for f in (2, 4, 8, 16)] + [f"chan_bf16_f{f}" for f in (4, 8, 16)]
    out += [f"tok_fp32_f{f}" for f in (2, 4, 8)] + [f"tok_bf16_f{f}" for f in (2, 4, 8)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["8,64,2048", "4,64,8192", "1,64,32768", "1,128,131072"])
    args = ap.parse_args()
    dev = torch.device("cuda")
    ensure_context(dev)
    result = compile_cubin(SOURCE, "sm_90a", "probe.cu")
    module = Module(result.cubin, tuple(names()), dev.index or 0)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  copy {bw / 1e12:.3f} TB/s  torch {torch.__version__}")
    stream = torch.cuda.current_stream().cuda_stream
    for text in args.shapes:
        b, h, length = (int(v) for v in text.split(","))
        rows = b * h * 16
        x = torch.randn(rows, length, device=dev).bfloat16()
        ys = {"fp32": torch.empty(rows, length, device=dev), "bf16": torch.empty_like(x)}
        floors = {o: x.numel() * (2 + ys[o].element_size()) / bw * 1e3 for o in ys}
        rows_t = [("torch x.float()", "fp32", bench_ms(lambda y=ys["fp32"], x=x: y.copy_(x)))]
        rows_t.append(("torch bf16 copy", "bf16", bench_ms(lambda y=ys["bf16"], x=x: y.copy_(x))))
        for name in names():
            out = name.split("_")[1]
            y = ys[out]
            y.fill_(float("nan"))
            kind = name.split("_")[0]
            per_warp = 16 * 64 * 16 if kind == "chan" else 8 * 256
            for threads in (128, 256):
                warps = rows * length // per_warp
                grid = (warps * 32 + threads - 1) // threads
                vals = [ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr()),
                        ctypes.c_longlong(rows), ctypes.c_longlong(length)]  # fmt: skip
                argv = (ctypes.c_void_p * 4)(*[ctypes.addressof(v) for v in vals])
                k = module.kernels[name]

                def run(k=k, grid=grid, threads=threads, argv=argv) -> None:
                    k.launch_args(grid, threads, ctypes.addressof(argv), stream)

                run()
                torch.cuda.synchronize()
                if not torch.equal(y, x.to(y.dtype)):
                    raise SystemExit(f"{name} wrote wrong values at {text}")
                rows_t.append((f"{name} w{threads // 32}", out, bench_ms(run)))
        for label, out, ms in rows_t:
            print(f"B,H,L={text:>13} {label:<22} {ms:.4f} ms  {floors[out] / ms:5.1%} of floor ({out} out)")


if __name__ == "__main__":
    main()
