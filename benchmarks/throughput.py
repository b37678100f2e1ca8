"""Attribution throughput of seq-instrument against Inseq, on a GPT-2-small-shaped model (random weights).

    PYTHONPATH=. python benchmarks/throughput.py --repeats 3
    PYTHONPATH=. python benchmarks/throughput.py --methods saliency,integrated_gradients --no-inseq
    PYTHONPATH=. python benchmarks/throughput.py --device cuda        # on a GPU, both libraries

One prompt of 13 tokens and a forced continuation of 10 tokens (23 in all) are attributed by both
libraries, on the same model object, with the same texts and targets (attributed function: the
probability of each target token), `show_progress=False`, and torch's default thread count. Repeats
alternate ours / Inseq so that machine noise hits both alike; the table gives medians.

Methods: saliency, input_x_gradient, integrated_gradients (n_steps=50; `--ig-internal-batch-size N`
passes internal_batch_size=N to both libraries, else each uses its own default: Inseq / Captum all
50 path points of a step in one pass, ours the library default),
layer_gradient_x_activation over all 12 blocks (ours in one call with `target_layers="layers"`,
Inseq in 12 calls, one per `target_layer=model.transformer.h[i]`, whose times are summed),
attention (every layer and head kept, Inseq's output; ours with `aggregate_fn=None`) and occlusion
(each library's defaults: one-token windows over the whole embedding; both keep one score per
token, Inseq its absolute value, so ours is compared as `.abs()`).

The unit of the last column ("bare s", timed between the repeats of each method, as the load of a
shared machine changes by the minute) is one bare forward + backward (gradient w.r.t. the input
embeddings of the probability of the last token) of the whole 23-token sequence. After the table, the largest
difference between the two libraries' attributions per method, relative to Inseq's largest value,
says whether both did the same work.

No network: the tokenizer is a byte-level BPE trained at startup on the text below, wrapped in a
`PreTrainedTokenizerFast` (its vocabulary is smaller than the model's 50257, which stays).
Inseq is optional (`pip install --no-deps inseq` plus captum, jaxtyping, typeguard<=2.13.3,
treescope, matplotlib, tqdm); when it cannot be imported the Inseq columns say why.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import time
import warnings

import torch
import transformers

# The repository root replaces this folder at the head of the path: benchmarks/kernels.py must not shadow
# the `kernels` package that transformers imports when it is installed.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import instrument  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog while the farmer watches"
CONTINUATION = " from his porch and thinks about the long winter ahead"
PROMPT_TOKENS, CONTINUATION_TOKENS = 13, 10
CORPUS = f"""{PROMPT}{CONTINUATION}.
A language model predicts the next token of a text from the tokens before it. Attribution methods
say which input tokens mattered for each prediction: saliency takes the gradient of the predicted
probability with respect to the input embeddings, input times gradient multiplies it by the
embeddings, and integrated gradients averages gradients along a straight path from a baseline to
the input. Layer methods do the same for the outputs of inner layers of the network.
The farmer and his dog walk to the river in the morning, and the fox runs back to the old forest.
"""
METHODS = (
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
    "layer_gradient_x_activation",
    "attention",
    "occlusion",
)
N_STEPS = 50


def bpe_tokenizer(corpus: list[str], vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE trained offline on `corpus` (the benchmarks' texts), `<|endoftext|>` as BOS, EOS
    and PAD. Other benchmarks build their tokenizers with it."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        corpus, vocab_size=vocab_size, min_frequency=1, show_progress=False, special_tokens=["<|endoftext|>", "<unk>"]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        unk_token="<unk>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def gpt2_small(tokenizer, vocab_size: int = 50257, layers: int = 12) -> transformers.GPT2LMHeadModel:
    """GPT-2 small's shape with seeded random weights; special token ids follow the tokenizer
    (Inseq reads EOS / BOS / PAD from the model config). Other benchmarks build their models with it."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=768,
        n_layer=layers,
        n_head=12,
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE trained offline on CORPUS: every word of the benchmark texts is one token."""
    return bpe_tokenizer([CORPUS] * 20, vocab_size=1000)


def build_model(tokenizer) -> transformers.GPT2LMHeadModel:
    return gpt2_small(tokenizer)


def check_texts(tokenizer) -> torch.Tensor:
    prompt = tokenizer(PROMPT)["input_ids"]
    full = tokenizer(PROMPT + CONTINUATION)["input_ids"]
    if (
        len(prompt) != PROMPT_TOKENS
        or len(full) != PROMPT_TOKENS + CONTINUATION_TOKENS
        or full[: len(prompt)] != prompt
    ):
        raise SystemExit(
            f"Tokenization changed: prompt {len(prompt)} tokens, prompt + continuation {len(full)} "
            f"(want {PROMPT_TOKENS} and {PROMPT_TOKENS + CONTINUATION_TOKENS}, the prompt a prefix)"
        )
    return torch.tensor([full])


def load_inseq():
    """(inseq module, versions) or (None, why not)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import inseq
    except Exception as error:  # ImportError, or an incompatibility with this transformers
        return None, f"{type(error).__name__}: {error}".splitlines()[0][:160]
    from importlib.metadata import version

    return inseq, f"inseq {version('inseq')}, captum {version('captum')}"


# -- the runs -------------------------------------------------------------------------------------


def ours_runner(model, tokenizer, method: str, ig_batch):
    """A function attributing the benchmark texts with seq-instrument; returns [23, 10(, 12), 768]."""
    ig_options = {"n_steps": N_STEPS, **({} if ig_batch is None else {"internal_batch_size": ig_batch})}
    options = {
        "saliency": {},
        "input_x_gradient": {},
        "integrated_gradients": ig_options,
        "layer_gradient_x_activation": {"target_layers": "layers"},
        "attention": {"aggregate_fn": None},  # every layer and head kept, as Inseq returns them
        "occlusion": {},
    }[method]
    wrapped = instrument.load_model(model, method, tokenizer=tokenizer)

    def run():
        out = wrapped.attribute(PROMPT, PROMPT + CONTINUATION, show_progress=False, **options)
        attributions = out[0].target_attributions
        # Both keep one score per token; Inseq its absolute value, ours the signed score.
        return attributions.abs() if method == "occlusion" else attributions

    return run


def inseq_runner(inseq, model, tokenizer, method: str, ig_batch):
    """The same with Inseq; the 12 layers are 12 wrappers, each hooked to one block, run in turn."""
    tokenizer = copy.deepcopy(tokenizer)  # Inseq sets padding_side="left" on the tokenizer it gets
    ig_options = {"n_steps": N_STEPS, **({} if ig_batch is None else {"internal_batch_size": ig_batch})}
    options = {"integrated_gradients": ig_options}.get(method, {})
    if method == "layer_gradient_x_activation":
        wrapped = [
            inseq.load_model(model, method, tokenizer=tokenizer, device=model.device.type, target_layer=block)
            for block in model.transformer.h
        ]
    else:
        wrapped = [inseq.load_model(model, method, tokenizer=tokenizer, device=model.device.type)]

    def run():
        # Inseq reads `output.attentions`, which only eager attention fills: switched on for its run
        # (ours switches by itself), and back after.
        attention = method == "attention" and model.config._attn_implementation != "eager"
        if attention:
            saved = model.config._attn_implementation
            model.set_attn_implementation("eager")
        try:
            results = [
                w.attribute(PROMPT, PROMPT + CONTINUATION, show_progress=False, **options)[0].target_attributions
                for w in wrapped
            ]
        finally:
            if attention:
                model.set_attn_implementation(saved)
        return results[0] if len(results) == 1 else torch.stack(results, dim=2)

    return run


def bare_runner(model, ids: torch.Tensor):
    """One forward + backward of the whole sequence: d p(last token) / d input embeddings."""
    embedding = model.get_input_embeddings()

    def run():
        with torch.enable_grad():
            embeds = embedding(ids).detach().requires_grad_()
            logits = model(inputs_embeds=embeds, use_cache=False).logits[0, -2]
            probability = logits.softmax(-1)[ids[0, -1]]
            return torch.autograd.grad(probability, embeds)[0]

    return run


def timed(run):
    synchronize()
    start = time.perf_counter()
    result = run()
    synchronize()
    return time.perf_counter() - start, result


def synchronize():
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> str:
    """max |ours - theirs| / max |theirs| over positions both fill; NaN layouts must agree."""
    ours, theirs = ours.detach().float(), theirs.detach().float()
    if ours.shape != theirs.shape:
        return f"shapes differ: ours {tuple(ours.shape)}, Inseq {tuple(theirs.shape)}"
    ours_nan, theirs_nan = torch.isnan(ours), torch.isnan(theirs)
    note = "" if torch.equal(ours_nan, theirs_nan) else f" ({int((ours_nan != theirs_nan).sum())} NaN cells differ)"
    both = ~(ours_nan | theirs_nan)
    scale = theirs[both].abs().max()
    return f"{float((ours[both] - theirs[both]).abs().max() / scale):.2e}{note}  shape {tuple(ours.shape)}"


# -- main -----------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per library and method (median kept)")
    parser.add_argument("--no-inseq", action="store_true", help="time seq-instrument only")
    parser.add_argument(
        "--ig-internal-batch-size",
        type=int,
        default=None,
        help="internal_batch_size of integrated gradients, both libraries (default: each library's own)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N) (default: leave torch's default, one per core)",
    )
    parser.add_argument("--device", default="cpu", help="where the model runs, e.g. cuda (default: cpu)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)}; choose from {','.join(METHODS)}")

    print(
        "$ PYTHONPATH=. python "
        + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    )
    inseq, about = (None, "--no-inseq") if args.no_inseq else load_inseq()
    tokenizer = build_tokenizer()
    device = torch.device(args.device)
    ids = check_texts(tokenizer).to(device)
    model = build_model(tokenizer).to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(
        f"GPT-2-small shape (random weights), {ids.shape[1]} tokens ({PROMPT_TOKENS} prompt + {CONTINUATION_TOKENS} "
        f"attributed), torch {torch.__version__}, {where}, transformers {transformers.__version__}, "
        f"native kernels: {instrument.kernels.has_extension()}, load average {os.getloadavg()[0]:.2f}"
    )
    print("Inseq: " + (f"available ({about})" if inseq else f"not available ({about})"))

    bare = bare_runner(model, ids)
    bare()

    rows, differences = [], []
    for method in methods:
        ours = ours_runner(model, tokenizer, method, args.ig_internal_batch_size)
        theirs = inseq_runner(inseq, model, tokenizer, method, args.ig_internal_batch_size) if inseq else None
        ours_times, inseq_times, bare_times = [], [], []
        # The first call of each is a warm-up; its attributions are the ones compared.
        _, ours_result = timed(ours)
        inseq_result = timed(theirs)[1] if theirs else None
        for _ in range(args.repeats):
            # The unit is timed next to each method (median of 3 per repeat): the load changes by the minute.
            bare_times.append(statistics.median(timed(bare)[0] for _ in range(3)))
            ours_times.append(timed(ours)[0])
            if theirs:
                inseq_times.append(timed(theirs)[0])
        ours_s = statistics.median(ours_times)
        inseq_s = statistics.median(inseq_times) if inseq_times else None
        rows.append((method, ours_s, inseq_s, statistics.median(bare_times), ours_times, inseq_times))
        if theirs:
            differences.append((method, relative_difference(ours_result, inseq_result)))
        print(f"  done {method}: ours {ours_s:.3f} s" + (f", Inseq {inseq_s:.3f} s" if inseq_s else ""), flush=True)

    print()
    print(f"{'method':40}{'ours s':>10}{'Inseq s':>10}{'Inseq/ours':>12}{'bare s':>9}{'ours/bare':>11}")
    for method, ours_s, inseq_s, bare_s, _, _ in rows:
        label = method + (" (12 layers)" if method.startswith("layer_") else "")
        inseq_cell = f"{inseq_s:10.3f}{inseq_s / ours_s:12.2f}" if inseq_s else f"{'-':>10}{'-':>12}"
        print(f"{label:40}{ours_s:10.3f}{inseq_cell}{bare_s:9.3f}{ours_s / bare_s:11.1f}")
    print(
        f"median of {args.repeats} repeats after one warm-up each; bare s: one forward + backward of the "
        f"{ids.shape[1]}-token sequence, timed between the repeats of that method"
    )
    print(
        "all times: "
        + "; ".join(
            f"{m}: ours {[round(t, 3) for t in o]}" + (f" Inseq {[round(t, 3) for t in i]}" if i else "")
            for m, _, _, _, o, i in rows
        )
    )
    if differences:
        print("\nmax |ours - Inseq| / max |Inseq| per method (target attributions; NaN = positions a step cannot see):")
        for method, text in differences:
            print(f"  {method:30}{text}")
    print(f"load average after: {os.getloadavg()[0]:.2f} (2-core machine: above ~2 means other work shared the cores)")


if __name__ == "__main__":
    main()
