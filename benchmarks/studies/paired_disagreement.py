"""How precisely one test set compares two models: the paired difference of their top-1 and its
standard error, from the images only one of them gets right.

With n test images, a = images only the first model gets right, b = only the second:

    difference = (a - b) / n,    SE = sqrt((a + b) / n - difference^2) / sqrt(n)

(the standard error of a paired difference of proportions). Run on two rows' written models
(``benchmarks/cache/rows/``), it says whether a lead between them is inside the test set's noise.
With ``--original``, the same for agreement with the original network's top class instead of
the label: how faithfully each pruned model reproduces the original on each test set.

    python -m benchmarks.studies.paired_disagreement FIRST.onnx SECOND.onnx [--original benchmarks/cache/cifar10_resnet56.onnx]
"""

from __future__ import annotations

import argparse

from benchmarks.common import DATA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--original", help="also compare agreement with this model's top class")
    args = parser.parse_args()

    import torch

    import graphprune as gp
    from graphprune.data import Preprocessing, load_tiny_set
    from graphprune.evaluate import predictions

    paths = [args.first, args.second] + ([args.original] if args.original else [])
    models = [gp.load(path) for path in paths]
    for name in ("test_lossless", "test_jpeg"):
        test = load_tiny_set(DATA[name], Preprocessing((3, 32, 32)))
        with torch.inference_mode():
            predicted = [predictions(m, test.images, batch_size=500) for m in models]
        _compare(name, "top-1", [p == test.labels for p in predicted[:2]])
        if args.original:
            _compare(name, "agreement with the original", [p == predicted[2] for p in predicted[:2]])


def _compare(name: str, what: str, right) -> None:
    n = len(right[0])
    only_first, only_second = int((right[0] & ~right[1]).sum()), int((~right[0] & right[1]).sum())
    diff = (only_first - only_second) / n
    se = ((only_first + only_second) / n - diff ** 2) ** 0.5 / n ** 0.5
    print(f"{name}: n {n}, {what} {100 * right[0].float().mean():.2f} vs {100 * right[1].float().mean():.2f}, "
          f"only first {only_first}, only second {only_second}, difference {100 * diff:+.2f} (SE {100 * se:.2f})")


if __name__ == "__main__":
    main()
