"""A one-off comparison of `attnlrp` with `lxt` 2.1 (Achtibat et al.'s own implementation), which
needs transformers 4.51 to 4.x: run in two environments, not collected by pytest.

    python tests/lxt_compare.py save OUT_DIR        # this project's environment: weights and our relevance
    LXT=/path/to/venv/bin/python                     # torch, transformers>=4.51,<5, lxt==2.1 (--no-deps)
    for a in gpt2 llama; do for v in attnlrp cp; do $LXT tests/lxt_compare.py check OUT_DIR $v $a; done; done

The fixtures (gpt2, llama; float64) are rebuilt in the old transformers from the same hyperparameters
and the saved weights; each prints the largest difference relative to the largest relevance.
"""

import sys
from pathlib import Path

import torch

TEXT, PROMPT = "Hello world, this is", "Hello world"
HYPER = dict(hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, positions=256)


def save(out: Path):
    sys.path.insert(0, str(Path(__file__).parent))
    import instrument

    from helpers import double_model

    out.mkdir(parents=True, exist_ok=True)
    for arch in ("gpt2", "llama"):
        model, tokenizer = double_model(arch)
        ids = torch.tensor(tokenizer(TEXT)["input_ids"])
        am = instrument.load_model(model, "attnlrp", tokenizer=tokenizer)
        ours = {}
        for variant in ("attnlrp", "cp"):
            seq = am.attribute(PROMPT, TEXT, attributed_fn="logit", variant=variant, show_progress=False)[0]
            ours[variant] = seq.target_attributions[: len(ids) - 1, -1].double()
        torch.save(
            {"state": model.state_dict(), "ids": ids, "vocab": model.config.vocab_size, "ours": ours}, out / arch
        )


def build(arch, vocab):
    import transformers

    h = HYPER
    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab,
            n_embd=h["hidden"],
            n_layer=h["layers"],
            n_head=h["heads"],
            n_inner=h["ffn"],
            n_positions=h["positions"],
            attn_implementation="eager",
        )
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=h["hidden"],
        num_hidden_layers=h["layers"],
        num_attention_heads=h["heads"],
        num_key_value_heads=h["kv_heads"],
        intermediate_size=h["ffn"],
        max_position_embeddings=h["positions"],
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config)


def check(out: Path, variant: str, arch: str):
    import types

    from transformers.models.gpt2 import modeling_gpt2
    from transformers.models.llama import modeling_llama

    if "torchvision" not in sys.modules:  # lxt imports torchvision's ViT for its own patch map only
        try:
            import torchvision  # noqa: F401
        except ImportError:
            vision = types.ModuleType("torchvision.models.vision_transformer")
            stub = type("Stub", (), {})
            vision.nn = types.SimpleNamespace(GELU=stub, LayerNorm=stub, MultiheadAttention=stub)
            for name in ("torchvision", "torchvision.models"):
                sys.modules[name] = types.ModuleType(name)
            sys.modules["torchvision.models"].vision_transformer = vision
            sys.modules["torchvision.models.vision_transformer"] = vision
    from lxt.efficient import monkey_patch
    from lxt.efficient.models import gpt2 as lxt_gpt2
    from lxt.efficient.models import llama as lxt_llama

    maps = {"gpt2": (modeling_gpt2, lxt_gpt2), "llama": (modeling_llama, lxt_llama)}
    # One architecture per process: lxt's patches of the attention functions, which transformers' modules
    # share, are global, and a second model's patch is refused as "already patched".
    module, rules = maps[arch]
    if True:
        monkey_patch(module, rules.cp_LRP if variant == "cp" else rules.attnLRP)
        saved = torch.load(out / arch)
        model = build(arch, saved["vocab"]).double().eval()
        model.load_state_dict(saved["state"], strict=True)
        ids = saved["ids"]
        embeds = model.get_input_embeddings()(ids[None, :-1]).detach().requires_grad_()
        model(inputs_embeds=embeds, use_cache=False).logits[0, -1, ids[-1]].backward()
        theirs = (embeds * embeds.grad)[0]
        ours = saved["ours"][variant]
        error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        print(f"{arch} {variant}: max |ours - lxt| / max |lxt| = {error:.2e}")


if __name__ == "__main__":
    if sys.argv[1] == "save":
        save(Path(sys.argv[2]))
    else:
        check(Path(sys.argv[2]), sys.argv[3], sys.argv[4])
