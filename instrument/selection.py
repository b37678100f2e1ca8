"""Resolve module selectors (names, globs, types, modules, architecture aliases) to module names.

    >>> select_modules(gpt2, ["transformer.h.*.mlp", "lm_head"])
    ['transformer.h.0.mlp', 'transformer.h.1.mlp', 'lm_head']
    >>> select_modules(bart, "decoder.layers")
    ['model.decoder.layers.0', 'model.decoder.layers.1']

Aliases are found from the model's structure, so they work on any Hugging Face family that follows
the usual layout: `"embeddings"`, `"layers"`, `"attention"`, `"cross_attention"`, `"mlp"`,
`"lm_head"`, each optionally prefixed by `"encoder."` or `"decoder."` on encoder-decoders.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Iterable, Sequence, Union

from torch import nn

Selector = Union[str, nn.Module, type]

ALIASES = ("embeddings", "layers", "attention", "cross_attention", "mlp", "lm_head")
_SELF_ATTENTION = {"attn", "self_attn", "attention", "self_attention", "SelfAttention"}
_CROSS_ATTENTION = {"encoder_attn", "EncDecAttention", "crossattention", "cross_attn", "cross_attention"}
_MLP = {"mlp", "feed_forward", "ffn", "DenseReluDense"}
_MLP_OUTPUT = {"fc2"}  # families (OPT, BART, Marian) whose feed-forward is two bare linears in the block


class UnknownModuleError(ValueError):
    """A selector matched no module of the model; the message names close matches."""


def select_modules(model: nn.Module, selectors: Selector | Sequence[Selector] | None) -> list[str]:
    """Names of the modules picked by `selectors`, in the model's registration order, no duplicates.

    >>> select_modules(model, [model.lm_head, "layers"])
    """
    if selectors is None:
        return []
    if isinstance(selectors, (str, nn.Module, type)):
        selectors = [selectors]
    names = {id(module): name for name, module in model.named_modules()}
    order = list(names.values())
    picked: set[str] = set()
    for selector in selectors:
        found = _resolve(model, selector, names, order)
        if not found:
            raise UnknownModuleError(_no_match_message(selector, order))
        picked.update(found)
    return [name for name in order if name in picked]


def _resolve(model: nn.Module, selector: Selector, names: dict, order: list[str]) -> list[str]:
    if isinstance(selector, nn.Module):
        return [names[id(selector)]] if id(selector) in names else []
    if isinstance(selector, type):
        return [name for name, module in model.named_modules() if isinstance(module, selector)]
    if not isinstance(selector, str):
        raise TypeError(f"A module selector must be a name, glob, alias, module or type, not {type(selector).__name__}")
    if selector in order and selector != "":
        return [selector]
    stack, _, alias = selector.rpartition(".")
    if alias in ALIASES and stack in ("", "encoder", "decoder"):
        return resolve_alias(model, alias, stack or None)
    if any(char in selector for char in "*?["):
        return [name for name in order if name and fnmatch.fnmatchcase(name, selector)]
    return []


def resolve_alias(model: nn.Module, alias: str, stack: str | None = None) -> list[str]:
    """Module names an architecture alias stands for, optionally only inside the encoder or decoder.

    >>> resolve_alias(t5, "attention", "encoder")
    ['encoder.block.0.layer.0.SelfAttention', 'encoder.block.1.layer.0.SelfAttention']
    """
    names = {id(module): name for name, module in model.named_modules()}
    if alias == "lm_head":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        found = [names[id(head)]] if head is not None and id(head) in names else []
    elif alias == "embeddings":
        found = [names[id(module)] for module in _input_embeddings(model) if id(module) in names]
    else:
        found = []
        for layer_name in _layer_names(model):
            if alias == "layers":
                found.append(layer_name)
            else:
                found.extend(_inside_layer(model.get_submodule(layer_name), layer_name, alias))
    if stack is not None:
        root = _stack_name(model, stack, names)
        found = [name for name in found if root is not None and (root == "" or name.startswith(root + "."))]
    return found


def _input_embeddings(model: nn.Module) -> list[nn.Module]:
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        stacks = [model.get_encoder(), model.get_decoder()]
        return [stack.get_input_embeddings() for stack in stacks]
    return [model.get_input_embeddings()] if hasattr(model, "get_input_embeddings") else []


def _stack_name(model: nn.Module, stack: str, names: dict) -> str | None:
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "" if stack == "decoder" else None
    module = model.get_encoder() if stack == "encoder" else model.get_decoder()
    return names.get(id(module))


def _layer_names(model: nn.Module) -> list[str]:
    """Elements of the ModuleLists that hold the transformer blocks (homogeneous `*Layer`/`*Block`)."""
    layers: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(layer + ".") for layer in layers):
            continue
        kinds = {type(child) for child in module}
        if len(kinds) == 1 and type(module[0]).__name__.endswith(("Layer", "Block")):
            layers.extend(f"{name}.{index}" for index in range(len(module)))
    return layers


def _inside_layer(layer: nn.Module, layer_name: str, alias: str) -> list[str]:
    wanted = {"attention": _SELF_ATTENTION, "cross_attention": _CROSS_ATTENTION, "mlp": _MLP}[alias]
    found = _outermost(layer, wanted)
    if not found and alias == "mlp":
        found = _outermost(layer, _MLP_OUTPUT)
    return [f"{layer_name}.{name}" for name in found]


def _outermost(layer: nn.Module, leaf_names: set[str]) -> list[str]:
    found: list[str] = []
    for name, _ in layer.named_modules():
        if name and name.rpartition(".")[2] in leaf_names and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def _no_match_message(selector: Selector, order: Iterable[str]) -> str:
    text = selector if isinstance(selector, str) else repr(selector)
    candidates = [name for name in order if name] + list(ALIASES)
    close = difflib.get_close_matches(str(text), candidates, n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return (
        f"No module matches {text!r}.{hint} Use an exact name from model.named_modules(), a glob "
        f"such as 'transformer.h.*.mlp', a module type, or an alias: {', '.join(ALIASES)}."
    )
