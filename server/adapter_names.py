"""Engine names of merged adapters (vLLM's lora_name): the composition's canonical model
string, so that `vllm:lora_requests_info` lists compositions as clients name them.

The Gateway API Inference Extension's endpoint picker scores a pod by whether the request's
`model` is among that metric's running (1.0) or waiting (0.6) adapters; a composition key
(sha256 hex) never matched. The canonical string (`CompositionSpec.model_string()`, e.g.
`code*0.5+math*0.5@cat`) parses back to the same composition, so a client that sends it gets
affinity; other spellings of the composition are served the same but not matched by name."""

from __future__ import annotations


class AdapterNames:
    """Names of the compositions registered in this process. A composition gets its canonical
    model string unless another live key holds it (the same string merged from skill files
    that have changed since): then `<string>#<first 12 hex of its key>`. vLLM tells the
    adapters of one batch apart by name (LoRARequest hashes and compares lora_name), so two
    live keys never share a name."""

    def __init__(self) -> None:
        self._by_key: dict[str, str] = {}
        self._by_name: dict[str, str] = {}

    def name_for(self, key: str, model_string: str) -> str:
        if key in self._by_key:
            return self._by_key[key]
        name = model_string if model_string not in self._by_name else f"{model_string}#{key[:12]}"
        self._by_key[key], self._by_name[name] = name, key
        return name

    def release(self, key: str) -> str | None:
        """Forget `key`; its name (returned) may go to another key from now on."""
        name = self._by_key.pop(key, None)
        if name is not None:
            del self._by_name[name]
        return name
