"""A class-per-position output (``fidelity.output_layout`` ``sequence``) read as a CTC recogniser's text.

Its users decode it greedily: the top class at each position, runs of one class collapsed to one,
the blank class removed (:func:`ctc_text`). The blank is not in the file: it is taken to be the
class that is the original's top class at the most positions over the images (a recogniser's blank
fills the positions between characters: PP-OCRv4's class 0, at most of them), and the report says
which and at what share, so a token classifier (whose runs are not collapsed) can be told apart.
Summed over the images, with d the edit distance (insertions, deletions, substitutions) of the two
texts (:class:`CtcText`):

    text_agreement       = images whose texts are equal / images
    character_error_rate = sum d(text_optimised, text_original) / sum |text_original|

(None where the original read no character on any image).

The int8 plan judges a recogniser by the text it reads (:func:`same_text`) where the blank fills at
least ``MIN_BLANK_SHARE`` of the original's positions, as a CTC recogniser's does (PP-OCRv4's
rec: 66 to 79% on rendered lines); otherwise by the same top class at every position, the strict
reading a token classifier needs. Int8 moves a character's boundary by a position without changing
the text, which the strict reading counts as a change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MIN_BLANK_SHARE = 0.5  # below it the commonest class is no CTC blank (not a measured knee)


def ctc_text(tops: list[int], blank: int) -> list[int]:
    """Greedy CTC: ``tops`` (the top class at each position) with runs collapsed and ``blank`` removed."""
    return [c for i, c in enumerate(tops) if c != blank and (i == 0 or c != tops[i - 1])]


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions from ``a`` to ``b``."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
    return row[-1]


def blank_class(tops: torch.Tensor) -> tuple[int, float]:
    """The original's commonest top class over all positions (``tops``: N x T), and its share."""
    counts = torch.bincount(tops.flatten())
    blank = int(counts.argmax())
    return blank, float(counts[blank]) / tops.numel()


def same_text(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor | None:
    """Per image, whether ``output`` reads ``reference``'s CTC text; None where ``reference``'s
    commonest class fills under ``MIN_BLANK_SHARE`` of its positions (no CTC blank)."""
    theirs, ours = _tops(reference), _tops(output)
    blank, share = blank_class(theirs)
    if share < MIN_BLANK_SHARE:
        return None
    return torch.tensor([ctc_text(a, blank) == ctc_text(b, blank) for a, b in zip(ours.tolist(), theirs.tolist())])


def _tops(output: torch.Tensor) -> torch.Tensor:
    return output.argmax(-1).reshape(len(output), -1)


@dataclass
class CtcText:
    """Two ``sequence`` outputs read as CTC text, their top classes kept batch by batch (N x T
    integers: small next to the outputs)."""

    original: list = field(default_factory=list)
    optimized: list = field(default_factory=list)

    def add(self, original: torch.Tensor, optimized: torch.Tensor) -> None:
        self.original.append(_tops(original))
        self.optimized.append(_tops(optimized))

    def as_dict(self) -> dict:
        theirs, ours = torch.cat(self.original), torch.cat(self.optimized)
        blank, share = blank_class(theirs)
        same = errors = length = 0
        for their_tops, our_tops in zip(theirs.tolist(), ours.tolist()):
            their_text, our_text = ctc_text(their_tops, blank), ctc_text(our_tops, blank)
            same += their_text == our_text
            errors += edit_distance(our_text, their_text)
            length += len(their_text)
        return {"blank": blank, "blank_share": share,
                "text_agreement": same / len(theirs), "character_error_rate": errors / length if length else None}
