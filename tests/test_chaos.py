"""Crash at any step, nothing lost (tests/chaos.py): a 2-rank run has a rank killed with SIGKILL at a random
step, while reading a checkpoint and while writing one, is relaunched with the same command each time, and
ends bit for bit where an uninterrupted run does, with the same loss at every step."""

import chaos
import pytest


@pytest.mark.dist
def test_sigkill_at_a_step_during_a_load_and_during_a_save_loses_nothing(tmp_path):
    result = chaos.run(tmp_path, steps=12, save_every=3, kills=3, seed=3, timeout=240, log=print)
    kinds = {k.split()[0] for k in result["kills"]}
    assert {"step", "load", "save"} <= kinds, result  # every moment was hit
    assert result["identical"], result
    assert result["same_losses"] and result["steps_logged"] == 12, result
