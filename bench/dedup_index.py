"""Scale check of ``data_tools dedup``'s pair search: time and peak memory of the faiss index on N random unit vectors
with a known number of injected near-duplicate pairs, and how many of them the search finds.

    python bench/dedup_index.py --n 1000000 --dim 128 --pairs 1000 --index ivf [--nprobe 8] [--out bench/results/x.json]
    python bench/dedup_index.py --n 20000 --index flat

The vectors are drawn in float32 chunks (N × D × 4 bytes is the only large array). Each injected pair is a random
vector and a noisy copy whose cosine to it is about halfway between the threshold and 1; random unit vectors in 128
dimensions are nearly orthogonal (the largest cosine among 1M of them is about 0.7), so every pair found above the
threshold that was not injected is counted as ``extra``. It runs :func:`data_tools.dedup.build_index` and
:func:`data_tools.dedup.search_pairs`, the same calls ``dedup`` makes. Peak RSS is the kernel's VmHWM of this
process; ``--threads`` sets faiss's OpenMP threads (default: all cores).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_tools.dedup import build_index, search_pairs  # noqa: E402


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def random_vectors(n: int, dim: int, pairs: int, threshold: float, seed: int = 0):
    """((n, dim) float32 unit rows, (pairs, 2) int64 injected pairs (original, copy)) with each copy's cosine to
    its original near ``(1 + threshold) / 2``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vectors = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65536):  # chunks keep the float64 temporaries small
        chunk = rng.standard_normal((min(65536, n - start), dim))
        vectors[start : start + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    chosen = rng.choice(n, 2 * pairs, replace=False).reshape(pairs, 2)
    target = (1 + threshold) / 2
    sigma = math.sqrt((1 / target**2 - 1) / dim)  # cos(v, v + e) ≈ 1 / sqrt(1 + sigma² dim) for unit v
    noisy = vectors[chosen[:, 0]] + sigma * rng.standard_normal((pairs, dim)).astype(np.float32)
    vectors[chosen[:, 1]] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    return vectors, chosen


def simulate(
    n: int,
    dim: int = 128,
    pairs: int = 1000,
    threshold: float = 0.95,
    index: str = "flat",
    nlist: int | None = None,
    nprobe: int = 8,
    seed: int = 0,
    threads: int | None = None,
) -> dict:
    """Build the index over simulated vectors, search the pairs, and return the measurements."""
    import faiss
    import numpy as np

    if threads:
        faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    vectors, injected = random_vectors(n, dim, pairs, threshold, seed)
    made = time.perf_counter()
    faiss_index = build_index(vectors, index, nlist, nprobe, seed)
    built = time.perf_counter()
    i, j, _, nearest = search_pairs(faiss_index, vectors, threshold)
    searched = time.perf_counter()
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    want = {(min(a, b), max(a, b)) for a, b in injected.tolist()}
    true_sims = (vectors[injected[:, 0]] * vectors[injected[:, 1]]).sum(1)
    return {
        "n": n,
        "dim": dim,
        "index": index,
        "nlist": getattr(faiss_index, "nlist", None),
        "nprobe": getattr(faiss_index, "nprobe", None),
        "threshold": threshold,
        "threads": faiss.omp_get_max_threads(),
        "injected_pairs": len(want),
        "injected_above_threshold": int((true_sims >= threshold).sum()),
        "found_injected": len(found & want),
        "recall": len(found & want) / max(1, int((true_sims >= threshold).sum())),
        "extra_pairs": len(found - want),
        "nearest_median": float(np.nanmedian(nearest)),
        "vectors_s": round(made - start, 3),
        "build_s": round(built - made, 3),
        "search_s": round(searched - built, 3),
        "vectors_mib": round(vectors.nbytes / 2**20, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="vectors")
    parser.add_argument("--dim", type=int, default=128, help="dimension")
    parser.add_argument("--pairs", type=int, default=1000, help="injected near-duplicate pairs")
    parser.add_argument("--threshold", type=float, default=0.95, help="cosine similarity of a pair")
    parser.add_argument("--index", choices=["flat", "ivf"], default="flat", help="faiss index")
    parser.add_argument("--nlist", type=int, default=None, help="IVF cells (default sqrt(N))")
    parser.add_argument("--nprobe", type=int, default=8, help="IVF cells searched per query")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="faiss OpenMP threads")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    args = parser.parse_args(argv)
    result = simulate(
        args.n, args.dim, args.pairs, args.threshold, args.index, args.nlist, args.nprobe, args.seed, args.threads
    )
    print(
        f"n={result['n']} dim={result['dim']} {result['index']} (nlist {result['nlist']}, nprobe {result['nprobe']}): "
        f"found {result['found_injected']}/{result['injected_above_threshold']} injected pairs, "
        f"{result['extra_pairs']} extra; build {result['build_s']} s, search {result['search_s']} s; "
        f"vectors {result['vectors_mib']} MiB, peak RSS {result['peak_rss_mib']} MiB"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
