"""Learned CAT (LoRA Soups): one weight per adapter per module, learned on a little data.

The skill adapters stay frozen, and so does the base model. Every adapted linear layer
computes

    y = W x + Σ_i softmax(θ_m)_i · s_i · B_i A_i x

with one logit vector θ_m per module m (initialised to the starting weights; zeros give
equal weights 1/N, the default `cat`). A few hundred Adam steps on the prompt/completion
pairs minimise the completion's cross-entropy. The softmax keeps each module's weights
positive and summing to 1: a trial in the skill lab found that skills summed at full strength
destroy each other. The learned weights are served exactly by `cat` with `module_weights`
(merging.merge); `loramix tune-cat` (lab/tune_cat.py) saves them as a named composition.
Imports only torch and merging: `model` is any causal LM called as model(input_ids, attention_mask,
labels) -> .loss whose linear layers carry the adapters' module names (transformers).

    result = tune_cat(model, tokenizer, adapters, examples, steps=300)
    merging.merge(adapters, method="cat", module_weights=result.module_weights)
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from merging.adapter import LoraAdapter
from merging.errors import IncompatibleAdaptersError, InvalidMergeOptions


@dataclass
class TuneResult:
    """Learned per-module weights (one per adapter, adapters' order) and what training saw."""

    module_weights: dict[str, list[float]]
    info: dict = field(default_factory=dict)


class _WeightedCat(nn.Module):
    """A frozen linear layer plus the softmax-weighted sum of frozen LoRA updates."""

    def __init__(self, base: nn.Linear, adapters: Sequence[LoraAdapter], module: str, logits: torch.Tensor):
        super().__init__()
        self.base = base
        dtype, device = base.weight.dtype, base.weight.device
        present = [i for i, a in enumerate(adapters) if module in a.modules]
        lora = [adapters[i].modules[module] for i in present]
        # Columns of the stacked factors, and which adapter each belongs to.
        self.register_buffer("lora_a", torch.cat([m.lora_a for m in lora]).to(device, dtype), persistent=False)
        self.register_buffer(
            "lora_b", torch.cat([m.lora_b * m.scaling for m in lora], dim=1).to(device, dtype), persistent=False
        )
        owner = torch.cat([torch.full((m.rank,), i) for i, m in zip(present, lora)])
        self.register_buffer("owner", owner.to(device), persistent=False)
        self.logits = nn.Parameter(logits.to(device, torch.float32))

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        column_weights = self.weights()[self.owner].to(x.dtype)
        return self.base(x) + ((x @ self.lora_a.T) * column_weights) @ self.lora_b.T


def _encode(tokenizer, examples: Sequence[tuple[str, str]], chat: bool = False) -> list[tuple[list[int], int]]:
    """(token ids of prompt + completion + eos, number of prompt tokens) per example. With
    `chat`, the prompt is one user message rendered by the tokenizer's chat template (as the
    server renders a chat request) and the completion is the assistant's turn."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidMergeOptions("the tokenizer has no end-of-sequence token", param="data")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise InvalidMergeOptions("the base model's tokenizer has no chat template", param="chat")
    encoded = []
    for prompt, completion in examples:
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
        else:
            prompt_ids = tokenizer(prompt).input_ids
        completion_ids = tokenizer(completion, add_special_tokens=False).input_ids + [eos]
        encoded.append((prompt_ids + completion_ids, len(prompt_ids)))
    return encoded


def _batch(encoded, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 outside the completions)."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for row, (tokens, prompt_len) in enumerate(encoded):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
        labels[row, prompt_len:len(tokens)] = torch.tensor(tokens[prompt_len:])
    return ids.to(device), mask.to(device), labels.to(device)


def _loss(model, batch) -> torch.Tensor:
    ids, mask, labels = batch
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def _initial_logits(init_weights: Sequence[float] | None, count: int) -> torch.Tensor:
    if init_weights is None:
        return torch.zeros(count)
    if len(init_weights) != count or any(not (math.isfinite(w) and w > 0) for w in init_weights):
        raise InvalidMergeOptions(f"initial weights must be {count} positive numbers", param="weights")
    return torch.log(torch.tensor(init_weights, dtype=torch.float32) / sum(init_weights))


def _wrap(model, adapters, init: torch.Tensor) -> dict[str, _WeightedCat]:
    """Replace each adapted linear layer of `model` by a _WeightedCat (in place)."""
    modules = sorted({m for a in adapters for m in a.modules})
    problems = []
    for module in modules:
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            problems.append(f"{module!r} is not a module of the base model")
            continue
        shape = next(a.modules[module] for a in adapters if module in a.modules)
        if not isinstance(layer, nn.Linear) or tuple(layer.weight.shape) != (shape.out_features, shape.in_features):
            problems.append(f"{module!r} is not a {shape.out_features}x{shape.in_features} linear layer of the base model")
    if problems:
        raise IncompatibleAdaptersError("the adapters do not fit this base model: " + "; ".join(problems[:5]))
    wrapped = {}
    for module in modules:
        parent_name, _, child = module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped[module] = _WeightedCat(getattr(parent, child), adapters, module, init.clone())
        setattr(parent, child, wrapped[module])
    return wrapped


def _unwrap(model, wrapped: dict[str, _WeightedCat]) -> None:
    for module, layer in wrapped.items():
        parent_name, _, child = module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)


def _check_args(adapters, examples, steps: int, lr: float, batch_size: int) -> None:
    if len(adapters) < 2:
        raise InvalidMergeOptions("tune-cat needs at least two adapters", param="skills")
    if steps < 1 or batch_size < 1 or not (lr > 0 and math.isfinite(lr)):
        raise InvalidMergeOptions("steps, batch size and learning rate must be positive", param="steps")
    if len(examples) < 2:
        raise InvalidMergeOptions("tune-cat needs at least two training examples", param="data")


@contextlib.contextmanager
def _weighted(model, adapters, init: torch.Tensor) -> Iterator[dict[str, _WeightedCat]]:
    """`model` frozen, in eval mode (no dropout: only the weights are learnt), its adapted layers
    wrapped; on exit, the layers, requires_grad flags and training mode as they were."""
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    model.requires_grad_(False)
    wrapped = _wrap(model, adapters, init)
    try:
        model.eval()
        yield wrapped
    finally:
        _unwrap(model, wrapped)
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad.get(name, param.requires_grad))
        model.train(was_training)


def _mean_loss(model, encoded, pad: int, device, batch_size: int) -> float:
    """Mean completion loss over `encoded`, without gradients."""
    with torch.no_grad():
        total = 0.0
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            total += float(_loss(model, _batch(chunk, pad, device))) * len(chunk)
        return total / len(encoded)


def _train(model, wrapped, train, rng: random.Random, pad: int, device, *, steps: int, lr: float,
           batch_size: int, progress) -> list[float]:
    """Adam on the wrapped layers' logits over random batches of `train`; the loss per step."""
    optimizer = torch.optim.Adam([layer.logits for layer in wrapped.values()], lr=lr)
    losses = []
    for step in range(1, steps + 1):
        chunk = [train[rng.randrange(len(train))] for _ in range(batch_size)]
        loss = _loss(model, _batch(chunk, pad, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress:
            progress(step, losses[-1])
    return losses


def tune_cat(
    model,
    tokenizer,
    adapters: Sequence[LoraAdapter],
    examples: Sequence[tuple[str, str]],
    *,
    steps: int = 300,
    lr: float = 0.05,
    batch_size: int = 32,
    seed: int = 0,
    holdout: float = 0.1,
    init_weights: Sequence[float] | None = None,
    chat: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> TuneResult:
    """Learn CAT's per-module adapter weights on (prompt, completion) pairs; see the module doc.

    `model` is a transformers causal LM whose module names match the adapters' (it is
    modified during training and restored before returning). A `holdout` fraction of the
    examples (at least one) measures the completion loss before and after. Deterministic for
    a given seed on a given device. `chat`: prompts are user messages of a chat model (_encode).
    """
    _check_args(adapters, examples, steps, lr, batch_size)
    started = time.perf_counter()
    rng = random.Random(seed)
    encoded = _encode(tokenizer, examples, chat)
    rng.shuffle(encoded)
    held = max(1, int(len(encoded) * holdout))
    held_out, train = encoded[:held], encoded[held:]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    with _weighted(model, adapters, _initial_logits(init_weights, len(adapters))) as wrapped:
        before = _mean_loss(model, held_out, pad, device, batch_size)
        losses = _train(model, wrapped, train, rng, pad, device, steps=steps, lr=lr,
                        batch_size=batch_size, progress=progress)
        after = _mean_loss(model, held_out, pad, device, batch_size)
        module_weights = {m: [round(float(w), 6) for w in layer.weights().detach()] for m, layer in wrapped.items()}

    mean = [sum(row[i] for row in module_weights.values()) / len(module_weights) for i in range(len(adapters))]
    info = {
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "chat": chat,
        "train_examples": len(train),
        "heldout_examples": len(held_out),
        "heldout_loss_before": before,
        "heldout_loss_after": after,
        "train_loss_first": losses[0],
        "train_loss_last": sum(losses[-10:]) / len(losses[-10:]),
        "mean_weights": mean,
        "seconds": time.perf_counter() - started,
    }
    return TuneResult(module_weights, info)
