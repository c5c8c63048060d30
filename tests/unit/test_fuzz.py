"""The fuzz corpus (``tests/fuzz.py``): a fixed set of seeds, 10,000 adversarial objects with
canaries, through the store, the merge and both renderers of both families. No crash, every
canary programmed, nothing of an object's text outside its field (hardening issue)."""

from __future__ import annotations

import pytest

from tests import fuzz

SEEDS = [1, 2, 3, 4, 5]


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_batch(seed: int):
    batch = fuzz.generate(seed, objects=2000, canary_count=20)
    assert len(batch) >= 2000
    rendered = fuzz.check(batch, canary_count=20)
    # The batch really was adversarial: most mutated objects are refused, each with a reason.
    assert len(rendered[0].state.problems) > 300


def test_the_checks_can_fail():
    """The checker itself: an object's text outside a comment, or a lost canary, is caught."""
    batch = fuzz.canaries(3)
    good = fuzz.check(batch, canary_count=3)
    assert good
    with pytest.raises(fuzz.Broken, match="canaries lost"):
        fuzz.check(batch[2:], canary_count=3)
