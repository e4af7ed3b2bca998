"""An attempt's bookkeeping (router/attempt.py): the load it puts on its nodes is given back once, however the
attempt ends, and its phase only moves forward. The attempt on real nodes is what the cluster tests run."""

from __future__ import annotations

import logging

import pytest

from baton.router.attempt import Attempt, AttemptSettings, NodeHolds, Phase, Try
from baton.router.picker import Picker
from baton.v1 import node_pb2


def test_holds_are_given_back_once_each_whatever_ends_the_attempt():
    picker = Picker(membership=None)
    with NodeHolds(picker, {"prefill-0": 300, "decode-0": 0}) as holds:
        assert picker.in_flight == {"prefill-0": 1, "decode-0": 1}
        assert picker.in_flight_tokens == {"prefill-0": 300}  # the prompt tokens it is to compute
        holds.give_back("prefill-0")  # its first token came: the prefill node's part is over
        holds.give_back("prefill-0")  # twice is once
        assert picker.in_flight == {"decode-0": 1} and picker.in_flight_tokens == {}
    assert picker.in_flight == {}
    with pytest.raises(RuntimeError), NodeHolds(picker, {"decode-0": 40}):
        raise RuntimeError("the attempt failed")
    assert picker.in_flight == {} and picker.in_flight_tokens == {}


def test_a_phase_never_moves_back(caplog):
    attempt = Attempt(Try(req=None, internal_id="r", resumed=node_pb2.Resumed(), deadline=None), decode=None,
                      prefill=None, picker=Picker(membership=None), stubs=None, settings=AttemptSettings(),
                      release_later=lambda release: None)
    attempt._enter(Phase.PREFILLING)
    with caplog.at_level(logging.ERROR, logger="baton.router.attempt"):
        attempt._enter(Phase.RESERVING)
    assert attempt.phase == Phase.PREFILLING and "refused move from PREFILLING back to RESERVING" in caplog.text
    attempt._enter(Phase.ENDED)
    assert attempt.phase == Phase.ENDED
