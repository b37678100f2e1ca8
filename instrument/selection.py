"""Resolve module selectors (names, globs, types, modules, architecture aliases) to module names.

    select_modules(gpt2, ["transformer.h.*.mlp", "lm_head"])
    ['transformer.h.0.mlp', 'transformer.h.1.mlp', 'lm_head']
    select_modules(gpt2, "transformer.h.*")      # the blocks, not what is inside them
    ['transformer.h.0', 'transformer.h.1']
    select_modules(bart, "decoder.layers")
    ['model.decoder.layers.0', 'model.decoder.layers.1']

Globs match dotted names component by component, as shell globs match paths: `*` (and `?`,
`[...]`) stay inside one component, `**` stands for any number of components (`"**.mlp"`: every
module called `mlp`; a trailing `"transformer.h.**"`: everything below `transformer.h`).

Aliases are found from the model's structure, so they work on any Hugging Face family that follows
the usual layout: `"embeddings"`, `"layers"`, `"attention"`, `"cross_attention"`, `"mlp"`,
`"lm_head"`, each optionally prefixed by `"encoder."` or `"decoder."` on encoder-decoders. For a
family laid out otherwise, `register_model_config` names its attention modules.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
from typing import Any, Iterable, Mapping, Sequence, Union

from torch import nn

Selector = Union[str, nn.Module, type]

ALIASES = ("embeddings", "layers", "attention", "cross_attention", "mlp", "lm_head")
_SELF_ATTENTION = {"attn", "self_attn", "attention", "self_attention", "SelfAttention"}
_CROSS_ATTENTION = {"encoder_attn", "EncDecAttention", "crossattention", "cross_attn", "cross_attention"}
_MLP = {"mlp", "feed_forward", "ffn", "DenseReluDense"}
_MLP_OUTPUT = {"fc2"}  # families (OPT, BART, Marian) whose feed-forward is two bare linears in the block


class UnknownModuleError(ValueError):
    """A selector matched no module of the model; the message names close matches."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Where a family keeps what `"attention"`, `"cross_attention"` and value zeroing look for.

        ModelConfig(self_attention_module="mixer", value_vector="values", cross_attention_module=None)

    self_attention_module: name of the self-attention module relative to a block (dotted names allowed).
    cross_attention_module: name of the cross-attention module relative to a decoder block.
    value_vector: name of the module, relative to an attention module, whose whole output is the value
        vectors (used by value zeroing). Inseq names a local variable of the attention's forward here;
        this library needs a module, such as `"v_proj"`.
    A field set to None keeps the built-in structural rule for it.
    """

    self_attention_module: Union[str, None]
    value_vector: Union[str, None]
    cross_attention_module: Union[str, None] = None


MODEL_CONFIGS: dict[str, ModelConfig] = {}


def register_model_config(
    model_type: str, config: Mapping[str, Any] | ModelConfig, overwrite: bool = False, allow_partial: bool = False
) -> None:
    """Tell the aliases where a family the built-in rules cannot read keeps its attention modules.

        register_model_config("my_lm", {"self_attention_module": "mixer", "value_vector": "values",
                                        "cross_attention_module": None})
        select_modules(my_model, "attention")  # ['layers.0.mixer', 'layers.1.mixer']

    `model_type` is matched against the model's class name (Inseq's key, e.g. `"GPT2LMHeadModel"`)
    first, then against `model.config.model_type`. `config` holds the fields of `ModelConfig`, all of
    them unless `allow_partial=True` (missing ones are None: built-in rule). Registering a type again
    raises ValueError unless `overwrite=True`.
    """
    if not isinstance(model_type, str) or not model_type:
        raise TypeError(f"model_type must be a non-empty string, got {model_type!r}")
    if isinstance(config, ModelConfig):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict or a ModelConfig, got {type(config).__name__}")
    fields = [field.name for field in dataclasses.fields(ModelConfig)]
    unknown = [key for key in config if key not in fields]
    if unknown:
        raise ValueError(
            f"config: unknown field(s) {', '.join(map(repr, unknown))}; the fields are {', '.join(fields)}"
        )
    missing = [field for field in fields if field not in config]
    if missing and not allow_partial:
        raise ValueError(
            f"config for {model_type!r} lacks {', '.join(missing)}; give them (None for 'use the built-in rule') "
            "or pass allow_partial=True"
        )
    for key, value in config.items():
        if value is not None and not (isinstance(value, str) and value and not any(c in value for c in "*?[")):
            raise ValueError(
                f"config[{key!r}] must be a module name relative to its parent (no globs) or None, got {value!r}"
            )
    if model_type in MODEL_CONFIGS and not overwrite:
        raise ValueError(f"A model config is already registered for {model_type!r}; pass overwrite=True to replace it")
    MODEL_CONFIGS[model_type] = ModelConfig(**{field: config.get(field) for field in fields})


def model_config(model: nn.Module) -> ModelConfig | None:
    """The config registered for `model` (by class name, then `config.model_type`), or None."""
    found = MODEL_CONFIGS.get(type(model).__name__)
    if found is None:
        found = MODEL_CONFIGS.get(getattr(getattr(model, "config", None), "model_type", None) or "")
    return found


def select_modules(model: nn.Module, selectors: Selector | Sequence[Selector] | None) -> list[str]:
    """Names of the modules picked by `selectors`, in the model's registration order, no duplicates.

    select_modules(model, [model.lm_head, "layers"])
    """
    if selectors is None:
        return []
    if isinstance(selectors, (str, nn.Module, type)):
        selectors = [selectors]
    elif not isinstance(selectors, Iterable) or isinstance(selectors, Mapping):
        raise TypeError(
            f"Modules are selected by a name, glob, alias, module, type or a list of them, "
            f"not {type(selectors).__name__}"
        )
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
        return [name for name in order if name and glob_match(name, selector)]
    return []


def glob_match(name: str, pattern: str) -> bool:
    """Whether the dotted module `name` matches `pattern`, one dotted component at a time.

    glob_match("transformer.h.0", "transformer.h.*"), glob_match("transformer.h.0.mlp", "transformer.h.*")
    (True, False)
    glob_match("transformer.h.0.mlp.c_fc", "**.mlp.*")
    True
    """
    return _match_parts(tuple(name.split(".")), tuple(pattern.split(".")))


@functools.lru_cache(maxsize=4096)
def _match_parts(names: tuple[str, ...], patterns: tuple[str, ...]) -> bool:
    if not patterns:
        return not names
    head, rest = patterns[0], patterns[1:]
    if head == "**":
        # A trailing `**` is "everything below", so it needs at least one component.
        first = 1 if not rest else 0
        return any(_match_parts(names[i:], rest) for i in range(first, len(names) + 1))
    return bool(names) and fnmatch.fnmatchcase(names[0], head) and _match_parts(names[1:], rest)


def resolve_alias(model: nn.Module, alias: str, stack: str | None = None) -> list[str]:
    """Module names an architecture alias stands for, optionally only inside the encoder or decoder.

    resolve_alias(t5, "attention", "encoder")
    ['encoder.block.0.layer.0.SelfAttention', 'encoder.block.1.layer.0.SelfAttention']
    """
    names = {id(module): name for name, module in model.named_modules()}
    registered = model_config(model)
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
                found.extend(_inside_layer(model.get_submodule(layer_name), layer_name, alias, registered))
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


def _inside_layer(layer: nn.Module, layer_name: str, alias: str, registered: ModelConfig | None) -> list[str]:
    field = {"attention": "self_attention_module", "cross_attention": "cross_attention_module"}.get(alias)
    name = getattr(registered, field) if registered is not None and field else None
    if name is not None:
        try:
            layer.get_submodule(name)
        except AttributeError:
            return []
        return [f"{layer_name}.{name}"]
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
        f"such as 'transformer.h.*.mlp' ('*' is one dotted component, '**' any number), a module type, or an "
        f"alias: {', '.join(ALIASES)}."
    )
