"""Context reliance: which part of the context made the model say what it said (`instrument attribute-context`).

PECoRe (context-sensitive tokens, then their contextual cues) in `pecore.py`; context attribution by
ablation (a sparse linear surrogate over random source ablations, as ContextCite) in `ablation.py`.
"""
