"""Engine adapter ids: positive int32 (vLLM's GPU runner keeps lora_int_id in int32 arrays;
a 56-bit id crashed vLLM 0.26's engine core on the H200), stable per key, never shared by two
live compositions."""

from __future__ import annotations

import hashlib

from server.composer import MAX_ADAPTER_ID, AdapterIds, adapter_id_for


def _key(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def test_ids_are_positive_int32_and_stable():
    for i in range(2000):
        key = _key(i)
        assert 1 <= adapter_id_for(key) <= MAX_ADAPTER_ID == 2**31 - 1
        assert adapter_id_for(key) == adapter_id_for(key)
    assert adapter_id_for("f" * 64) == MAX_ADAPTER_ID
    assert adapter_id_for("8" + "0" * 63) == 1  # the low 31 bits are zero: 0 is not an id


def test_keys_sharing_31_bits_get_different_ids():
    ids = AdapterIds()
    first, second = "ffffffff" + "0" * 56, "7fffffff" + "1" * 56  # same low 31 bits
    assert adapter_id_for(first) == adapter_id_for(second) == MAX_ADAPTER_ID
    assert ids.id_for(first) == MAX_ADAPTER_ID
    assert ids.id_for(second) == 1  # wraps past the largest int32
    assert ids.id_for(first) == MAX_ADAPTER_ID and ids.id_for(second) == 1


def test_a_released_id_can_go_to_another_key():
    ids = AdapterIds()
    first, second = "00000005" + "a" * 56, "80000005" + "b" * 56
    assert ids.id_for(first) == 5 and ids.id_for(second) == 6
    assert ids.release(first) == 5
    assert ids.release(first) is None
    assert ids.id_for(second) == 6  # a live key keeps its id
    assert ids.id_for(first) == 5
