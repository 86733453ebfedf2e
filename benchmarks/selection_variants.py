"""Alternatives to three steps of ``fixed_merge``'s selection, timed against what it does.

Each pair computes the same thing (checked): the source rows of the unit metric (flat ``index_select``
vs ``gather``), the mask that stops sources being destinations (``scatter_`` of an expanded index into
the columns of the ``(B, Ta, T)`` similarity vs a row ``index_fill_`` on the ``(B * T, Ta)`` view of the
other layout), and the whole step: similarity, mask and best destination (sources x tokens by ``bmm``,
max over the last dim, as ``fixed_merge`` does since c1463eb, vs tokens x sources by ``matmul``, max over
tokens, as it did before). Medians of ``--rounds`` calls, one thread, at the sizes of a DeiT-Tiny merge
block at 50% (T = 129 patch tokens, Ta = 32 sources, C = 192), batch 1 and 32.

    python benchmarks/selection_variants.py --rounds 300
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable

import torch

from rapid_search.runtime.ops import _flat
from rapid_search.tools.measure import time_callable


def _median_us(f: Callable[[], object], rounds: int) -> float:
    return time_callable(f, device="cpu", warmup=10, repeats=rounds).median_ms * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    T, C, ta = 129, 192, 32
    print("| batch | step | as fixed_merge does (µs) | alternative (µs) |\n|---|---|---|---|")
    for B in (1, 32):
        g = torch.Generator().manual_seed(B)
        m = torch.nn.functional.normalize(torch.randn(B, T, C, generator=g), dim=-1)  # (B, T, C)
        a = torch.stack([torch.randperm(T, generator=g)[:ta].sort().values for _ in range(B)])  # (B, Ta) sources
        ma = m.reshape(B * T, C).index_select(0, _flat(a, T)).view(B, ta, C)  # (B, Ta, C)
        assert torch.equal(ma, m.gather(1, a[..., None].expand(B, ta, C)))

        def ours() -> tuple[torch.Tensor, torch.Tensor]:
            sim = torch.bmm(ma, m.transpose(1, 2))  # (B, Ta, T)
            sim.scatter_(2, a[:, None, :].expand(B, ta, ta), float("-inf"))
            return sim.max(dim=2)

        def before() -> tuple[torch.Tensor, torch.Tensor]:
            sim = m @ ma.transpose(1, 2)  # (B, T, Ta)
            sim.view(B * T, ta).index_fill_(0, _flat(a, T), float("-inf"))
            return sim.max(dim=1)

        assert torch.equal(ours()[1], before()[1])
        sim_st, sim_ts = torch.bmm(ma, m.transpose(1, 2)), m @ ma.transpose(1, 2)  # (B, Ta, T), (B, T, Ta)
        pairs = [
            ("source rows", lambda: m.reshape(B * T, C).index_select(0, _flat(a, T)).view(B, ta, C), lambda: m.gather(1, a[..., None].expand(B, ta, C))),
            ("sources are no destinations", lambda: sim_st.scatter_(2, a[:, None, :].expand(B, ta, ta), float("-inf")),
             lambda: sim_ts.view(B * T, ta).index_fill_(0, _flat(a, T), float("-inf"))),
            ("similarity, mask and best destination", ours, before),
        ]  # fmt: skip
        with torch.inference_mode():
            for name, f_ours, f_alt in pairs:
                t_ours, t_alt = [], []
                for _ in range(5):  # alternate, medians of medians
                    t_ours.append(_median_us(f_ours, args.rounds))
                    t_alt.append(_median_us(f_alt, args.rounds))
                print(f"| {B} | {name} | {statistics.median(t_ours):.1f} | {statistics.median(t_alt):.1f} |", flush=True)


if __name__ == "__main__":
    main()
