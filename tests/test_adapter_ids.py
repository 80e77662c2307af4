"""Engine adapter ids: positive int32 (vLLM's GPU runner keeps lora_int_id in int32 arrays;
a 56-bit id crashed vLLM 0.26's engine core on the H200), stable per key, never shared by two
live compositions. Engine adapter names: the canonical composition string, never shared by
two live compositions either."""

from __future__ import annotations

import hashlib

from server.adapter_names import AdapterNames
from server.engine_adapters import MAX_ADAPTER_ID, AdapterIds, adapter_id_for
from server.engines.base import AdapterHandle
from tests.optional_deps import require_module


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


# --- names (vLLM's lora_name): the canonical composition string, unique among live keys ----------

def test_a_composition_is_named_by_its_canonical_string_and_keeps_its_name():
    names = AdapterNames()
    assert names.name_for(_key(1), "code*0.5+math*0.5@cat") == "code*0.5+math*0.5@cat"
    assert names.name_for(_key(1), "ignored: a live key keeps its name") == "code*0.5+math*0.5@cat"
    assert names.name_for(_key(2), "math*1.0@cat") == "math*1.0@cat"


def test_two_live_keys_never_share_a_name():
    """The same canonical string merged from changed skill files is another key; vLLM would
    drop one of two same-named adapters from a batch (LoRARequest hashes by name)."""
    names = AdapterNames()
    old, new = _key(1), _key(2)
    assert names.name_for(old, "code*0.5+math*0.5@cat") == "code*0.5+math*0.5@cat"
    assert names.name_for(new, "code*0.5+math*0.5@cat") == f"code*0.5+math*0.5@cat#{new[:12]}"
    assert names.release(old) == "code*0.5+math*0.5@cat"
    assert names.release(old) is None
    assert names.name_for(_key(3), "code*0.5+math*0.5@cat") == "code*0.5+math*0.5@cat"  # free again
    assert names.name_for(new, "code*0.5+math*0.5@cat") == f"code*0.5+math*0.5@cat#{new[:12]}"


def test_vllm_lora_request_carries_the_handle_name_and_int32_id(tmp_path):
    require_module("vllm")
    from server.engines.vllm.engine import _lora_request

    key = "ffffffff" + "0" * 56
    handle = AdapterHandle(adapter_id=AdapterIds().id_for(key), name="code*0.5+math*0.5@cat", path=tmp_path, rank=8)
    request = _lora_request(handle)
    assert (request.lora_name, request.lora_int_id, request.lora_path) == (handle.name, MAX_ADAPTER_ID, str(tmp_path))
