"""Where the rank goes: each layer's options are points (parameters saved, predicted output
error, rank), full rank first at (0, 0). Steps are taken along each layer's lower convex hull,
cheapest error per parameter first across all layers (a global priority queue), until enough
parameters are saved or the next step would overrun the error budget. The hull matters: the
first step of a layer jumps from its full weight to the break-even rank's two factors, and a
plain greedy on single steps of ``multiple`` mis-prices it."""

from __future__ import annotations

import heapq

Point = tuple[float, float, int | None]  # parameters saved, predicted error, rank (None: whole)


def hull(points: list[Point]) -> list[Point]:
    """The lower convex hull of ``points`` by parameters saved, from (0, 0) on."""
    ordered = sorted(points, key=lambda p: (p[0], p[1]))
    kept: list[Point] = []
    for p in ordered:
        while len(kept) >= 2:
            (x1, y1, _), (x2, y2, _) = kept[-2], kept[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                kept.pop()
            else:
                break
        if not kept or p[0] > kept[-1][0]:
            kept.append(p)
    return kept


def allocate(
    curves: list[list[Point]], saved: float = float("inf"), budget: float = float("inf")
) -> tuple[list[int | None], float, float]:
    """Per layer the rank chosen (None: left whole), with the parameters saved and the predicted
    error: steps by least error per parameter until ``saved`` parameters are saved or the next
    step would take the summed error past ``budget``."""
    hulls = [hull(c) for c in curves]
    at = [0] * len(hulls)
    queue: list[tuple[float, int]] = []

    def push(i: int) -> None:
        if at[i] + 1 < len(hulls[i]):
            (s0, e0, _), (s1, e1, _) = hulls[i][at[i]], hulls[i][at[i] + 1]
            heapq.heappush(queue, ((e1 - e0) / (s1 - s0), i))

    for i in range(len(hulls)):
        push(i)
    total_saved = total_error = 0.0
    while queue and total_saved < saved:
        _, i = heapq.heappop(queue)
        (s0, e0, _), (s1, e1, _) = hulls[i][at[i]], hulls[i][at[i] + 1]
        if total_error + e1 - e0 > budget:
            continue
        total_saved += s1 - s0
        total_error += e1 - e0
        at[i] += 1
        push(i)
    return [h[a][2] for h, a in zip(hulls, at)], total_saved, total_error
