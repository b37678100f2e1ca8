"""Two tiny trained models shipped with the package, on synthetic tasks whose ground truth is known.

    from instrument.demo import model_path, alignment_examples
    model = instrument.load_model(model_path("demo-mt"), "integrated_gradients")
    source, target, alignment = alignment_examples(1, seed=0)[0]
    out = model.attribute(source, target)   # alignment: (target word, source word) index pairs

- `demo-mt`: a MarianMTModel (d_model 64, 2+2 layers) translating the invented SVO language Sral
  into the invented SOV language Oumi word by word, adjectives moved after their nouns,
  prepositions after their noun phrases and the verb to the end; one token = one word.
- `demo-lm`: a GPT-2 (n_embd 64, 2 layers) that knows the capitals and languages of 120 invented
  countries: "the capital of X is" -> Y; and answers "the code of kelo is ba47 . the code of mira is
  tu11 . the code of kelo is" with "ba47", the code its context gives kelo (`lookup_examples`; codes
  are random per case, so the answer can only come from the answering sentence).

Both were trained by `scripts/train_demo_models.py` on the generators in `instrument.demo.tasks`.
"""

from __future__ import annotations

from pathlib import Path

from instrument.demo import tasks

DEMO_MODELS = ("demo-lm", "demo-mt")

__all__ = ["DEMO_MODELS", "alignment_examples", "fact_examples", "lookup_examples", "model_path", "tasks"]


def model_path(name: str) -> str | None:
    """The folder of demo model `name` inside the installed package, or None if `name` is no demo
    model (or its files are missing)."""
    if name not in DEMO_MODELS:
        return None
    folder = Path(__file__).resolve().parent / name
    return str(folder) if (folder / "config.json").is_file() else None


def alignment_examples(n: int, seed: int = 0) -> list[tuple[str, str, list[tuple[int, int]]]]:
    """`n` fresh `(source, target, alignment)` triples for demo-mt; alignment pairs are
    (target word index, source word index), one per target word (`</s>` not included).

    They come from the training distribution but from the held-out split: demo-mt never saw them.
    Deterministic per `seed`.
    """
    return tasks.sample_translations(n, seed=seed, held_out=True)


def fact_examples(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """`n` `(prompt, answer, subject)` triples for demo-lm, e.g. `("the capital of X is", "Y", "X")`,
    sampled from the facts it was trained on (without repeats while `n` <= the number of facts,
    120). Deterministic per `seed`; `subject` may be two words."""
    facts = tasks.facts()
    rng = tasks.Rng(f"facts-{seed}")
    chosen = []
    while len(chosen) < n:
        chosen += rng.sample(facts, min(len(facts), n - len(chosen)))
    return [(*tasks.fact_prompt(f), f.subject) for f in chosen]


def lookup_examples(n: int, seed: int = 0) -> list[tuple[list[str], str, str, int]]:
    """`n` fresh in-context lookup cases `(sentences, question, answer, index)` for demo-lm, e.g.
    `(["the code of kelo is ba47 .", "the code of mira is tu11 ."], "the code of mira is", "tu11", 1)`:
    the answer is random per case, so only sentence `index` of the context gives it. The model's input
    is `" ".join(sentences) + " " + question`. Deterministic per `seed`, never the training cases."""
    rng = tasks.Rng(f"lookup-examples-{seed}")
    return [tasks.lookup_case(rng) for _ in range(n)]
