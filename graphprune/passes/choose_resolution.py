"""Analysis: the largest internal resolution whose measured cut reaches the target.

The lever of :mod:`.resize_input` (a resize at the graph's entry; the file's input unchanged),
chosen by measurement as blocks are: candidate sides from the input's height down in steps of
``STEP`` pixels at 224 (in proportion to the side for others: 1 pixel at 32), the width scaled
alike, to ``MIN_SCALE`` of the side; each candidate timed interleaved with the original on the run's backend
(quantised with the plan's config where a usable int8 plan is present: the quantised-measurement
rule of :mod:`.plan_quantization`), largest first, until one reaches the goal (target plus margin);
then the sides between it and the last one short of the goal are bisected to the pixel, since
latency falls in steps (Lite0: a 22.4% cut at 192 px, 32.4% at 191), and the largest measured at
the goal is chosen: fewer pixels mostly cost more accuracy (Lite0 at 208, 192, 176 px: 83.00,
84.38, 81.50; benchmarks/studies/results/lite0_resolution.md). Where the two sides left are one
pixel apart, below the input's own (a step), the two sizes between them, one side of each (H x
W-1 and H-1 x W), are timed too, and where either measures at the goal it is chosen over the
smaller square (both: the larger cut, the surer of the target at the same pixels): a step halved
(Lite0: 21.9% at 192x192, 26.6% at 192x191 with top-1 82.25, 31.0% at 191x191 with 80.00;
benchmarks/studies/results/lite0_resolution.md, "Sizes between two squares"). Where quantisation alone reaches the goal, no resize is chosen.

A size timed within ``NEAR`` (a point) of the goal is timed again, up to ``MAX_TIMINGS`` times,
and judged by the mean: one timing is noisy by about a point on Lite0 (200 px: 17.3-20.0%, 192 px:
20.1-22.7% over a dozen runs), so single timings erred both ways, near the target, in the
benchmark's rows (benchmarks/results/real_models.md): upward, where the written files of two of
three 20% runs then timed 19.5% and 19.9%; downward, where 192 px timed 20.1% at a 20% target and the
run fell past the step to 191x192 (top-1 81.50 where 192 px keeps 84.38). The mean does not
remove it all: the noise comes in episodes of seconds to minutes, whichever sessions are timed
(benchmarks/studies/session_noise.py: one pair timed 12 times, sd 0.5-0.7 points), so the run's
final timing still measured 3 of 9 benchmark rows short of their target by 0.4-0.8 points.

The goal is the target plus ``MARGIN``, 1.5 points (``--resolution-margin``; blocks' ``--margin`` is
0.5): the lever lands at the goal, not past it by a block, so the written file's own timing meets
the target only where the margin covers the noise. Over 27 Lite0 rows that timing fell 0.44 points
below the chosen size's in the run on average, sd 0.79 (to -2.1); with a 0.5-point margin 3 of 9
rows ended short of their target, with 1.5 points none of 9 (20%: 21.0-22.2%; 22%: 25.6-26.2%; 30%:
30.4-32.9%), top-1 by target 83.71, 81.75, 79.83 against 83.96, 82.71, 80.46, the 22% mean lower
because 192 px, which timed 21.2% in the end, is no longer taken (benchmarks/results/real_models.md,
rows with margin=0.015).

Every candidate is checked to run before it is timed (:func:`.resize_input.check_resizable`),
and one that does not is passed over as short of the goal, not the end of the search: a YOLO's
neck concatenates its stride-32 map upsampled with the stride-16 one, so at 320 px it runs at 288
and 256 but not between (and at 319-289 px with 320's maps and latency). Where it cannot run at a
candidate, the candidate rounded down to multiples of 2 to 64 pixels is tried in its place
(:func:`.resize_input.aligned_sides`): YOLOX at 416 px runs at 384, 352, ..., none of the 15-pixel
steps from 416. A detector's boxes are mapped back to the input's pixels (:mod:`.box_outputs`),
read on the tiny set's first images.

No training follows: on EfficientNet-Lite0 (200 photos, 22%) the resize alone kept 84.38 top-1 of
87.12 on 800 other photos, where blocks kept 81.25, and recovery on 160 photos lowered top-1 on the
classes it had not seen (benchmarks/studies/lite0_resolution.py, lite0_recovery.py).
"""

from __future__ import annotations

import statistics

from ..errors import GraphpruneError
from ..model import Model
from .base import Analysis, PassResult
from .measure_latency import measure_cut
from .plan_quantization import measuring_backend, no_block_needed
from .quantize_plan import QuantizationPlan
from .resize_input import (CannotRunAt, ResolutionChoice, aligned_sides, check_resizable, output_shapes, resize_input,
                           resized_size, scale_for, scale_record, tiny_boxes)
from .selection import goal_cut

STEP = 8  # pixels per candidate at 224 px; the bisection below then finds the side to the pixel
NEAR = 0.01  # a size timed within this of the goal is timed again (one timing is noisy by about a point)
MAX_TIMINGS = 3  # ... up to this many times, and judged by the mean
MARGIN = 0.015  # the goal is the target plus this (see the module docstring)
# a detector that runs at no smaller size: an export at a fixed size bakes its anchor grid, its strides
# and the reshapes of its box distributions into constants (ultralytics' default dynamic=False: a
# (1, 2, 2100) grid and a (1, 4, 16, 2100) reshape at 320 px), which anchor_grid.py writes again for
# the new size where it understands every one of them
FIXED_ANCHORS = ("; a detector exported at a fixed input size keeps its anchor grid as constants of that size "
                 "(ultralytics' dynamic=False): export it with dynamic input sizes (dynamic=True) for this lever")
MIN_SCALE = 0.5  # below half the side a classifier has lost what its training saw (176 px: -5.6 top-1 on Lite0)


def candidate_sides(side: int) -> list[int]:
    """The internal sides tried, largest first, down to ``MIN_SCALE`` of ``side``."""
    step = max(1, round(STEP * side / 224))
    return list(range(side - step, int(side * MIN_SCALE) - 1, -step))


class ChooseResolution(Analysis):
    """Provides the :class:`ResolutionChoice` (see the module docstring)."""

    name = "choose_resolution"
    optional = (QuantizationPlan,)
    provides = (ResolutionChoice,)
    config_field = "resolution_margin"

    def __init__(self, margin: float = MARGIN):
        self.margin = margin  # the lever's own: it lands at the goal, where blocks land past it by a block

    def run(self, model: Model, ctx, inputs) -> PassResult:
        skipped = no_block_needed(ctx, inputs)
        if skipped:
            choice = ResolutionChoice(None, None, [], skipped.replace("no block is dropped", "no resize"))
            return PassResult(model, record=choice.to_dict(), artifacts=[choice])
        if ctx.latency_cut is None:
            raise GraphpruneError("choose_resolution needs a latency target")
        goal = goal_cut(ctx.latency_cut, self.margin)
        measuring = measuring_backend(ctx, inputs, self.name)
        reference = (measuring.reference or measuring.backend).prepare(ctx.original, ctx.latency)
        shape = ctx.original.analysis_shape()
        side = int(shape[-2])
        sides = candidate_sides(side)
        if not sides:
            raise GraphpruneError(f"the input's side, {side} pixels, is too small to lower inside the graph")
        measurements = {}  # by (height side, width side)
        expected = output_shapes(model)  # what every candidate must give (computed once: many are checked)
        boxes = tiny_boxes(model, ctx)  # a detector's, mapped back to the input's pixels
        unrunnable = {}  # by (height side, width side): why the network cannot run at that size

        def scale_of(sides: tuple[int, int]) -> float | tuple[float, float]:
            height, width = sides
            return scale_for(side, height) if height == width else (scale_for(side, height), scale_for(side, width))

        def reaches(candidate_side: int, width_side: int | None = None) -> bool:
            key = (candidate_side, candidate_side if width_side is None else width_side)
            if key in unrunnable or key in measurements:  # an aligned size that two candidates round to
                return key in measurements and measurements[key]["cut"] >= goal
            scale = scale_of(key)
            candidate = resize_input(model, scale, boxes)
            try:  # before any time is spent on a size the network cannot run at
                check_resizable(model, candidate, expected)
            except GraphpruneError as exc:  # a smaller map breaks a fixed reshape or window, or a YOLO neck's
                unrunnable[key] = exc  # concatenation off its steps of 32 px: not at the goal
                return False
            cuts = []  # timed again while the mean is within NEAR of the goal: too close to call
            while not cuts or (len(cuts) < MAX_TIMINGS and abs(statistics.fmean(cuts) - goal) < NEAR):
                cuts.append(measure_cut(measuring.backend, ctx.original, candidate, ctx.latency, reference).cut)
            measurements[key] = {"size": list(resized_size(shape, scale)), "scale": scale_record(scale),
                                 "cut": statistics.fmean(cuts), "timings": cuts}
            return measurements[key]["cut"] >= goal

        above = side  # the smallest side measured short of the goal (the input's own: no cut)
        for candidate in sides:
            for candidate_side in aligned_sides(candidate, sides[-1]):  # where it cannot run at the candidate,
                hit = reaches(candidate_side)  # the candidate rounded down to its strides' multiples
                if (candidate_side, candidate_side) not in unrunnable:
                    break
            if hit:
                break
            if (candidate_side, candidate_side) not in unrunnable:  # a size it cannot run at says nothing
                above = min(above, candidate_side)  # of the smaller ones (a YOLO runs at 288 and 256 px only)
        else:
            fixed = FIXED_ANCHORS if any(b.anchor_axis is not None and b.unmappable is None for b in boxes) else ""
            raise GraphpruneError(_unreachable(ctx.latency_cut, sides, measurements, unrunnable, fixed))
        below = candidate_side  # reaches the goal; latency falls by steps with the feature maps' sizes, so
        while above - below > 1:  # the largest side that reaches it lies in between: bisect
            middle = (above + below) // 2
            if reaches(middle):
                below = middle
            else:
                above = middle
        kept = (below, below)
        if above - below == 1 and above < side:  # a step between two measured squares: the sizes between
            between = [key for key in ((above, below), (below, above)) if reaches(*key)]
            if between:
                kept = max(between, key=lambda key: measurements[key]["cut"])
        chosen = measurements[kept]
        timings = len(chosen["timings"])
        choice = ResolutionChoice(scale_of(kept), tuple(chosen["size"]),
                                  [measurements[s] for s in sorted(measurements, reverse=True)],
                                  f"{chosen['size'][0]}x{chosen['size'][1]}: the largest size measured at the goal "
                                  f"({chosen['cut']:.1%} >= {goal:.1%}"
                                  + (f", the mean of {timings} timings)" if timings > 1 else ")")
                                  + _inside_margin(ctx.latency_cut, chosen, measurements))
        return PassResult(model, record=choice.to_dict(), artifacts=[choice])


def _unreachable(target: float, sides: list[int], measurements: dict, unrunnable: dict, fixed_hint: str) -> str:
    """Why no candidate side reached the goal, in one line (``fixed_hint`` added where the smaller
    sizes break its layers)."""
    if not measurements:  # it runs at no size below its own: why not at the largest it ran at, else the first
        ran = [exc for exc in unrunnable.values() if not isinstance(exc, CannotRunAt)]
        return str(ran[0] if ran else unrunnable[sides[0], sides[0]]) + fixed_hint
    best = max(m["cut"] for m in measurements.values())
    best = 0.0 if abs(best) < 0.0005 else best  # not "-0.0%"
    smallest = (sides[-1], sides[-1])
    if smallest in unrunnable:  # the smaller sizes break its layers: name the first below those it runs at
        ran = min(height for height, _ in measurements)
        first = max(key for key in unrunnable if key[0] < ran and key[0] == key[1])
        return (f"a {target:.0%} latency cut is not reachable by resolution: {unrunnable[first]}; the larger sizes "
                f"it runs at measure at most {best:.1%}{fixed_hint}")
    last = measurements[smallest]
    return (f"a {target:.0%} latency cut is not reachable by resolution: at {last['size'][0]}x{last['size'][1]} "
            f"({MIN_SCALE:.0%} of the side) it measures {last['cut']:.1%}")


def _inside_margin(target: float, chosen: dict, measurements: dict) -> str:
    """Where a larger size than the one chosen measured above the target but short of the goal, what
    the margin cost and how to take that size: a detector's sizes come in steps of 32 px (nudenet's
    YOLOv8n: 288 px at 16.1% against a 15% target, then 256 px at 33%)."""
    larger = [m for m in measurements.values() if target <= m["cut"] and m["size"][0] * m["size"][1]
              > chosen["size"][0] * chosen["size"][1]]
    if not larger:
        return ""
    near = max(larger, key=lambda m: m["size"][0] * m["size"][1])
    return (f"; {near['size'][0]}x{near['size'][1]} measured {near['cut']:.1%}, above the {target:.0%} target but "
            f"inside the margin: a smaller --resolution-margin takes it, at the risk of a final timing short of the "
            f"target")
