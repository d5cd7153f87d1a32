"""PyTorch CPU matmul on the shapes of benches/cpu_gemm.rs, for comparison.

Usage: /work/torchvenv/bin/python benches/torch_matmul.py [--threads 2] [--repeats 10]
Prints one line per shape: name, median seconds, GFLOP/s (2*M*N*K / median).
"""

import argparse
import statistics
import time

import torch

# (name, M, N, K, a_transposed, b_transposed): C[M,N] = op(A) . op(B); a_transposed means A is
# stored [K,M] (a weight gradient dW = dY^T . X), b_transposed that B is stored [N,K] (a Linear
# weight), like y = x . W^T in the model.
SHAPES = [
    ("square_1024", 1024, 1024, 1024, False, False),
    ("square_2048", 2048, 2048, 2048, False, False),
    ("debug_qkv_16384x768x256", 16384, 768, 256, False, True),
    ("debug_w1_16384x768x256_nn", 16384, 768, 256, False, False),
    ("debug_dw1_768x256x2048_tn", 768, 256, 2048, True, False),
    ("debug_dwq_256x256x2048_tn", 256, 256, 2048, True, False),
    ("proj_4096x8192x2048", 4096, 8192, 2048, False, True),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"backend: {torch.backends.cpu.get_cpu_capability()}")
    for name, m, n, k, at, bt in SHAPES:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(k, m, generator=g) if at else torch.randn(m, k, generator=g)
        b = torch.randn(n, k, generator=g) if bt else torch.randn(k, n, generator=g)
        out = torch.empty(m, n)

        def run():
            torch.matmul(a.t() if at else a, b.t() if bt else b, out=out)

        for _ in range(2):
            run()
        reps = args.repeats if m * n * k < 2**33 else max(3, args.repeats // 3)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        print(f"{name:32s} median {med * 1e3:9.2f} ms  {2 * m * n * k / med / 1e9:7.1f} GFLOP/s")


if __name__ == "__main__":
    main()
