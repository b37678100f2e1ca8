"""Trains the two demo models shipped in `instrument/demo/` on their synthetic tasks (CPU, about 11 minutes).

    PYTHONPATH=. python scripts/train_demo_models.py             # both, into instrument/demo/demo-{lm,mt}
    PYTHONPATH=. python scripts/train_demo_models.py --only mt --out /tmp/demo

demo-mt: a MarianMTModel translating the invented SVO language Sral into the invented SOV language
Oumi word by word (see `instrument.demo.tasks`); demo-lm: a GPT-2 that knows the capitals and
languages of invented countries and answers an in-context lookup ("the code of X is Y ." sentences,
then "the code of X is" -> Y, names and codes random per example). Both use word-level tokenizers
(one token = one word).

demo-lm learns the lookup only with two helps (without them it stays at chance, ~0.24, for 6,500+ steps):
copy rows (a random sequence of names and codes, then the same again) teach it induction heads, and for
its first `--lm-window-steps` its first layer sees only the last 3 tokens, so that "X is Y" puts X in
Y's residual stream and "of X is" puts X in the question's; after that the window is lifted and the
model learns to keep the same circuit under full attention.
Deterministic given `--seed` (same machine and torch version). Prints held-out accuracies at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from instrument.demo import tasks  # noqa: E402

DEMO_DIR = Path(__file__).resolve().parents[1] / "instrument" / "demo"
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}  # ids 0..3
MAX_POSITIONS = 64


def word_tokenizer(words: list[str], append_eos: bool) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (after the special tokens); `append_eos` adds `</s>` to every
    encoded text, as Marian tokenizers do for sources and targets."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    if append_eos:
        eos = SPECIAL_TOKENS["eos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, vocab[eos])]
        )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=MAX_POSITIONS,
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
        **SPECIAL_TOKENS,
    )


def schedule(optimizer, warmup: int, total: int, decay: int | None = None):
    """Linear warmup, then a cosine decay over the last `decay` steps (default: all after the warmup)."""
    decay = total - warmup if decay is None else decay

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, step - (total - decay)) / max(1, decay))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def train_step(model, optimizer, scheduler, input_ids, labels, pad_token_id: int) -> float:
    """One optimizer step on a right-padded batch; returns its loss."""
    loss = model(input_ids=input_ids, attention_mask=(input_ids != pad_token_id).long(), labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


# -- demo-mt ----------------------------------------------------------------------------------------------


def train_mt(args, out: Path) -> dict:
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    tokenizer = word_tokenizer(tasks.vocabulary("mt"), append_eos=True)
    config = transformers.MarianConfig(
        vocab_size=len(tokenizer),
        d_model=args.mt_dim,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=4 * args.mt_dim,
        decoder_ffn_dim=4 * args.mt_dim,
        max_position_embeddings=MAX_POSITIONS,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        activation_function="swish",
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        unk_token_id=tokenizer.unk_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
    )
    model = transformers.MarianMTModel(config)
    n_train = args.mt_steps * args.batch_size
    train = tasks.sample_translations(n_train, seed=args.seed)
    sources = tokenizer([s for s, _, _ in train])["input_ids"]
    targets = tokenizer(text_target=[t for _, t, _ in train])["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    scheduler = schedule(optimizer, args.warmup, args.mt_steps)
    model.train()
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(n_train, generator=generator).tolist()
    for step in range(args.mt_steps):
        batch = order[step * args.batch_size : (step + 1) * args.batch_size]
        input_ids = pad([sources[i] for i in batch], tokenizer.pad_token_id)
        labels = pad([targets[i] for i in batch], -100)
        loss = train_step(model, optimizer, scheduler, input_ids, labels, tokenizer.pad_token_id)
        if step % 100 == 0 or step == args.mt_steps - 1:
            print(f"mt step {step:5d} loss {loss:.4f} ({time.perf_counter() - started:.0f}s)", flush=True)
    model.eval()
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        max_length=MAX_POSITIONS,
        num_beams=1,
        do_sample=False,
    )
    held_out = tasks.sample_translations(args.eval_size, seed=args.seed + 1, held_out=True)
    correct = words = word_correct = 0
    with torch.no_grad():
        for start in range(0, len(held_out), 100):
            chunk = held_out[start : start + 100]
            batch = tokenizer([s for s, _, _ in chunk], return_tensors="pt", padding=True)
            generated = tokenizer.batch_decode(model.generate(**batch), skip_special_tokens=True)
            for (_, target, _), output in zip(chunk, generated):
                correct += output == target
                ref, hyp = target.split(), output.split()
                words += len(ref)
                word_correct += sum(r == h for r, h in zip(ref, hyp))
    save(model, tokenizer, out)
    return {
        "exact_match": correct / len(held_out),
        "word_accuracy": word_correct / words,
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - started,
    }


# -- demo-lm ----------------------------------------------------------------------------------------------


def train_lm(args, out: Path) -> dict:
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    tokenizer = word_tokenizer(tasks.vocabulary("lm"), append_eos=False)
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=args.lm_dim,
        n_layer=args.lm_layers,
        n_head=4,
        n_inner=4 * args.lm_dim,
        n_positions=MAX_POSITIONS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = transformers.GPT2LMHeadModel(config)
    corpus = [ids + [tokenizer.eos_token_id] for ids in tokenizer(tasks.lm_corpus())["input_ids"]]
    # Besides the facts, every batch holds fresh lookup cases (the answer is random per case, so only the
    # context gives it) and copy rows.
    n_lookup, n_copy = args.lm_lookup_rows, args.lm_copy_rows
    n_facts = args.batch_size - n_lookup - n_copy
    rng = tasks.Rng(f"lookup-train-{args.seed}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lm_lr, weight_decay=0.0, betas=(0.9, 0.98))
    scheduler = schedule(optimizer, args.warmup, args.lm_steps, decay=args.lm_decay_steps)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    order: list[int] = []
    with contextlib.ExitStack() as window:
        window.enter_context(local_attention(model.transformer.h[0].attn, LOOKUP_WINDOW))
        for step in range(args.lm_steps):
            if step == args.lm_window_steps:
                window.close()
                print(f"lm step {step:5d}: the first layer's attention window is lifted", flush=True)
            if len(order) < n_facts:
                order += torch.randperm(len(corpus), generator=generator).tolist()
            batch, order = order[:n_facts], order[n_facts:]
            rows = [(corpus[i], corpus[i]) for i in batch]
            rows += [lookup_row(tasks.lookup_case(rng), rng, tokenizer) for _ in range(n_lookup)]
            rows += [copy_row(rng, tokenizer) for _ in range(n_copy)]
            input_ids = pad([ids for ids, _ in rows], tokenizer.pad_token_id)
            labels = pad([target for _, target in rows], -100)
            loss = train_step(model, optimizer, scheduler, input_ids, labels, tokenizer.pad_token_id)
            if step % 100 == 0 or step == args.lm_steps - 1:
                print(f"lm step {step:5d} loss {loss:.4f} ({time.perf_counter() - started:.0f}s)", flush=True)
    model.eval()
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=8, do_sample=False
    )
    results = {}
    for name, template in tasks.FACT_TEMPLATES.items():
        pairs = [template(f) for f in tasks.facts()]
        hits = 0
        with torch.no_grad():
            for prompt, answer in pairs:
                ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
                generated = model.generate(ids, attention_mask=torch.ones_like(ids))[0, ids.shape[1] :]
                hits += tokenizer.decode(generated, skip_special_tokens=True).strip() == answer
        results[f"{name}_recall"] = hits / len(pairs)
    results["lookup_accuracy"] = lookup_accuracy(model, tokenizer, args.eval_size, seed=args.seed + 1)
    save(model, tokenizer, out)
    return {**results, "params": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - started}


LOOKUP_WINDOW = 3  # tokens the first layer sees while the window is on: "X is Y" and "of X is"


@contextlib.contextmanager
def local_attention(attention: torch.nn.Module, window: int):
    """Within the block, `attention` (a GPT-2 attention module) sees only the last `window` tokens,
    itself included; padding is ignored (training rows are right-padded, so it comes last)."""

    def windowed(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        length = hidden.shape[1]
        distance = torch.arange(length)[:, None] - torch.arange(length)[None, :]
        allowed = (distance >= 0) & (distance < window)
        kwargs["attention_mask"] = torch.zeros(length, length, dtype=hidden.dtype).masked_fill(
            ~allowed, torch.finfo(hidden.dtype).min
        )[None, None]
        return args, kwargs

    handle = attention.register_forward_pre_hook(windowed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def lookup_row(case, rng: tasks.Rng, tokenizer) -> tuple[list[int], list[int]]:
    """`(ids, labels)` of one lookup training row: the case's context, then `LOOKUP_QUESTIONS` questions
    about random sentences of it, each answered ("the code of X is Y .", the last one ending in `</s>`
    instead of "."). Only the answers and the final `</s>` are labels (-100 elsewhere): the rest is random."""
    sentences, _, _, index = case
    ids, labels = [], []
    for sentence in sentences:
        words = tokenizer(sentence)["input_ids"]
        ids += words
        labels += [-100] * len(words)
    asked = [index] + [rng.below(len(sentences)) for _ in range(LOOKUP_QUESTIONS - 1)]
    for k, i in enumerate(asked):
        words = tokenizer(sentences[i])["input_ids"]  # the code of X is Y .
        if k == len(asked) - 1:
            words[-1] = tokenizer.eos_token_id
        ids += words
        labels += [-100] * 5 + [words[5], words[6] if k == len(asked) - 1 else -100]
    return ids, labels


LOOKUP_QUESTIONS = 3  # 6 sentences and 3 questions: 63 tokens, within the 64 positions


def copy_row(rng: tasks.Rng, tokenizer) -> tuple[list[int], list[int]]:
    """`(ids, labels)`: 8 to 24 random names and codes, then the same again; the repeat is labelled."""
    names, codes = tasks.lookup_words()
    words = tokenizer.convert_tokens_to_ids([*names, *codes])
    sequence = [words[rng.below(len(words))] for _ in range(8 + rng.below(17))]
    return sequence + sequence, [-100] * (len(sequence) + 1) + sequence[1:]


def lookup_text(case, with_answer: bool = True) -> str:
    sentences, question, answer, _ = case
    return " ".join([*sentences, question] + ([answer] if with_answer else []))


def lookup_accuracy(model, tokenizer, n: int, seed: int) -> float:
    """Greedy next word after fresh "... the code of X is" prompts (left-padded batches), against the answer."""
    rng = tasks.Rng(f"lookup-eval-{seed}")
    cases = [tasks.lookup_case(rng) for _ in range(n)]
    rows = tokenizer([lookup_text(c, with_answer=False) for c in cases])["input_ids"]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = (input_ids != tokenizer.pad_token_id).long()
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    predicted = tokenizer.convert_ids_to_tokens(logits[:, -1].argmax(-1).tolist())
    return sum(p == c[2] for p, c in zip(predicted, cases)) / n


def save(model, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if stale.is_file():
            stale.unlink()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # transformers 5 writes its own class name; the 4.x one loads the same fast tokenizer in both.
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for file in out.iterdir():
        file.chmod(0o644)  # safetensors writes 0600


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="writes OUT/demo-mt and OUT/demo-lm")
    parser.add_argument("--only", choices=["mt", "lm"], default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mt-steps", type=int, default=1500)
    parser.add_argument("--mt-dim", type=int, default=64)
    parser.add_argument("--lm-steps", type=int, default=5000)
    parser.add_argument("--lm-window-steps", type=int, default=3000, help="steps with demo-lm's first layer windowed")
    parser.add_argument("--lm-decay-steps", type=int, default=1000, help="demo-lm's learning rate decays over these")
    parser.add_argument("--lm-lr", type=float, default=1e-3)
    parser.add_argument("--lm-dim", type=int, default=64)
    parser.add_argument("--lm-layers", type=int, default=2)
    parser.add_argument("--lm-lookup-rows", type=int, default=24, help="lookup cases in each batch of demo-lm")
    parser.add_argument("--lm-copy-rows", type=int, default=24, help="copy rows in each batch of demo-lm")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3, help="demo-mt's learning rate")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: these small matrices gain nothing "
        "from more, and on a busy machine 2 threads were 10x slower)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    report = {}
    if args.only in (None, "mt"):
        report["demo-mt"] = train_mt(args, args.out / "demo-mt")
    if args.only in (None, "lm"):
        report["demo-lm"] = train_lm(args, args.out / "demo-lm")
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    for name, values in report.items():
        size = sum(f.stat().st_size for f in (args.out / name).iterdir())
        print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()}, f"{size / 1e6:.2f} MB")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
