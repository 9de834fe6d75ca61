"""Exact greedy comparisons that know where they are allowed to part.

Two greedy runs of one prompt (DvD against transformers' InternVL, a request alone against the
same request among fifteen others) pick the same token at a step only as long as the choice is
clear: where the two largest logits are nearly equal, the last bits of a kernel or of a batch's
shape decide, and the runs may part there without anything being wrong. So a comparison walks
the steps in order: a step whose margin (top-1 minus top-2 logit) is at least ``MARGIN_BOUND``
must give the same token; the first step under the bound where the tokens differ ends the
comparison (what follows continues two different prefixes). The caller then asks that enough
steps were compared for the check to mean something, and every message says how far it got.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# The served log-probabilities agree with transformers' log_softmax to 1e-3
# (test_openai_parity.py), so one run's top-1/top-2 gap is within 2e-3 of the other's: a step
# whose gap is 1e-2 or more cannot flip between them. Only steps under it may part.
MARGIN_BOUND = 1e-2

# What a served request needs for ``served_margins``: the two best log-probabilities per step.
MARGIN_PARAMS: dict[str, Any] = {"logprobs": True, "top_logprobs": 2}


def served_margins(choice: dict[str, Any]) -> list[float]:
    """Top-1 minus top-2 log-probability of each generated step of a served choice (asked with
    ``MARGIN_PARAMS``). The log-probabilities of one step share one normaliser and come from
    the raw logits, so the difference is the gap between the two largest logits."""
    logprobs = choice.get("logprobs")
    assert logprobs, "the request did not ask for logprobs: pass MARGIN_PARAMS"
    margins = []
    for step, entry in enumerate(logprobs["content"]):
        top = entry["top_logprobs"]
        assert len(top) >= 2, f"step {step} has {len(top)} top_logprobs: pass MARGIN_PARAMS"
        margins.append(top[0]["logprob"] - top[1]["logprob"])
    assert len(margins) == len(choice["token_ids"]), "a step came back without logprobs"
    return margins


@dataclass(frozen=True)
class GreedyComparison:
    """How far two greedy runs were compared, and why it stopped there."""

    compared: int  # steps whose tokens were compared (all agreed)
    steps: int  # steps of the shorter run
    bound: float
    parted_at: int | None = None  # the near tie where the runs took different tokens
    margin_there: float | None = None

    @property
    def complete(self) -> bool:
        return self.parted_at is None

    def __str__(self) -> str:
        if self.parted_at is None:
            return (
                f"all {self.steps} steps compared and equal (a step whose top-1/top-2 logit "
                f"margin is >= {self.bound} must agree; one under it could have parted)"
            )
        return (
            f"{self.compared} of {self.steps} steps compared and equal; the runs part at step "
            f"{self.parted_at}, a near tie (margin {self.margin_there:.2g} < {self.bound}), "
            "where the last bits of a kernel or of the batch's shape may decide"
        )


def compare_greedy(
    actual: Sequence[int],
    expected: Sequence[int],
    margins: Sequence[Sequence[float]],
    *,
    min_compared: int,
    bound: float = MARGIN_BOUND,
    what: str = "greedy tokens",
) -> GreedyComparison:
    """Assert that ``actual`` follows ``expected`` at every step whose margin is at least
    ``bound`` (the smallest margin that any run in ``margins`` gives for that step), up to the
    first step under the bound where they differ, and, when they part there, that at least
    ``min_compared`` steps were compared. Without a parting the two runs must have the same
    length."""
    steps = min(len(actual), len(expected))
    for step in range(steps):
        if actual[step] == expected[step]:
            continue
        known = [float(run[step]) for run in margins if step < len(run)]
        assert known, f"{what}: no margin known for step {step}"
        margin = min(known)
        assert margin < bound, (
            f"{what} differ at step {step} ({actual[step]} != {expected[step]}), where the "
            f"top-1/top-2 logit margin is {margin:.3g} >= {bound}: not a near tie. "
            f"The {step} steps before it agree.\n"
            f"actual:   {list(actual)}\nexpected: {list(expected)}"
        )
        comparison = GreedyComparison(step, steps, bound, parted_at=step, margin_there=margin)
        break
    else:
        comparison = GreedyComparison(steps, steps, bound)
        assert len(actual) == len(expected), (
            f"{what}: one run is longer ({len(actual)} != {len(expected)} tokens) though "
            f"{comparison}"
        )
    # Whole answers that agree to their common end were compared entirely, however short
    # (a backbone may answer one token and its end); a comparison cut short by a near tie
    # must have covered enough steps to mean something.
    assert comparison.parted_at is None or comparison.compared >= min_compared, (
        f"{what}: fewer than {min_compared} steps compared, too few for the check to mean "
        f"anything: {comparison}"
    )
    return comparison
