"""Depth pruning: a student cut from a causal LM by keeping N of its decoder layers.

    kept = evenly_spaced(30, 10)                              # [0, 3, 6, ..., 27]
    kept = most_influential(block_influence(model, seqs), 10) # ShortGPT's rule
    prune_layers(model, kept)                                 # in place; config and indices too

Two rules choose the layers (jobs/prune_student.py runs them; docs/real-model.md has what they
chose on SmolLM2-135M-Instruct):

- `evenly_spaced`: layers floor(i * L / N), i = 0..N-1 (every third of 30 for N = 10);
- block influence (ShortGPT, Men et al. 2024, "ShortGPT: Layers in Large Language Models are More
  Redundant Than You Expect", eq. 1): BI_i = 1 - mean over tokens t of cos(x_i,t, x_i+1,t), x_i
  the hidden state entering layer i and x_i+1 the one leaving it, measured on calibration
  sequences; the N layers of highest BI are kept (a layer whose output is most similar to its
  input changes the least). Scored once on the whole model, as the paper does (not
  iteratively).

`prune_layers` keeps the chosen layers in their order, renumbers each attention's `layer_idx`
(the KV-cache slot), slices per-layer config entries (`layer_types`) and sets
`num_hidden_layers`; the embeddings, the final norm and the head are untouched, so tied
embeddings stay tied. With every layer kept the model is unchanged.

Pure torch: the model is any HF causal LM of SUPPORTED_MODEL_TYPES (`model.model.layers`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from eopd_ray.errors import EopdError

# HF `model_type`s whose decoder layers live in `model.model.layers`, tested here and in vLLM.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


class PruningError(EopdError):
    """A student cannot be cut as asked; says what is wrong and the values allowed."""


def check_prunable(config, keep: int, key: str = "--layers") -> None:
    """The model type is supported and 1 <= keep <= its number of layers."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise PruningError(
            f"cannot prune a {config.model_type!r} model ({', '.join(config.architectures or [])})"
            f"; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    total = config.num_hidden_layers
    if not 1 <= keep <= total:
        raise PruningError(
            f"{key} = {keep} is out of range: the model has {total} layers; keep between 1 and "
            f"{total} (all of them copies the model)"
        )


def evenly_spaced(num_layers: int, keep: int) -> list[int]:
    """Layers floor(i * num_layers / keep), i = 0..keep-1: the first always, spread evenly."""
    return [i * num_layers // keep for i in range(keep)]


def _layers(model) -> torch.nn.ModuleList:
    return model.model.layers


@torch.no_grad()
def block_influence(model, sequences: Iterable[torch.Tensor]) -> list[float]:
    """ShortGPT's BI of every decoder layer: 1 - cosine(input, output) of its hidden states,
    averaged over every token of `sequences` (each (1, T) token ids, unpadded)."""
    layers = _layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}
    hooks = []
    count = 0

    def before(index):
        def hook(module, args, kwargs):
            inputs[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def after(index):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output  # (1, T, H)
            cos = torch.nn.functional.cosine_similarity(
                inputs.pop(index).double(), out.double(), dim=-1
            )  # (1, T), in fp64: near-identical states sit at cos ~ 1 - 1e-4
            sums[index] += (1.0 - cos).sum().item()

        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(before(i), with_kwargs=True))
        hooks.append(layer.register_forward_hook(after(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        for ids in sequences:
            model(input_ids=ids, use_cache=False)
            count += ids.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise PruningError("no calibration tokens: give at least one non-empty sequence")
    return (sums / count).tolist()


def most_influential(scores: Sequence[float], keep: int) -> list[int]:
    """The `keep` layers of highest block influence, in model order (ties: the earlier layer)."""
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:keep])


def prune_layers(model, kept: Sequence[int]):
    """Keep only layers `kept` (ascending, distinct) of `model`, in place; returns it."""
    layers = _layers(model)
    total = len(layers)
    if list(kept) != sorted(set(kept)) or not kept or kept[0] < 0 or kept[-1] >= total:
        raise PruningError(f"layers to keep must be ascending, distinct, in 0..{total - 1}: {kept}")
    new = torch.nn.ModuleList(layers[i] for i in kept)
    for index, layer in enumerate(new):
        for module in layer.modules():  # the attention's KV-cache slot, wherever it is kept
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    model.model.layers = new
    config = model.config
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in kept]
    if getattr(config, "max_window_layers", None) is not None:
        # Qwen2/3: layers from this index on would use sliding-window attention (when on)
        config.max_window_layers = sum(i < config.max_window_layers for i in kept)
    config.num_hidden_layers = len(kept)
    return model
