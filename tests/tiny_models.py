"""Small random Hugging Face models with matching tokenizers, built offline for tests.

    model, tokenizer = tiny_model("llama", seed=0)
    logits = model(**tokenizer(["Hello world"], return_tensors="pt")).logits

Every model has hidden size 32, 2 layers (2 encoder + 2 decoder layers for encoder-decoders), 4 attention heads
and keeps its family's quirks and default dropout rates. Tokenizers are trained once per session on `CORPUS`.
"""

import functools

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DECODER_ONLY = ("gpt2", "gpt_neox", "llama", "qwen2", "opt")
ENCODER_DECODER = ("marian", "t5", "bart")
ALL_ARCHS = DECODER_ONLY + ENCODER_DECODER

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, MAX_POSITIONS = 32, 2, 4, 2, 64, 256

# Trained into the vocabulary first, so their ids are 0..3 in this order (the fairseq / BART layout).
SPECIAL_TOKENS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}

CORPUS = [
    "The capital of France is Paris.",
    "Hello world, this is a test.",
    "The capital of Germany is Berlin, and the capital of Italy is Rome.",
    "Paris is the largest city in France; Berlin is the largest in Germany.",
    "The quick brown fox jumps over the lazy dog.",
    "A small model can still learn simple patterns.",
    'She said: "I will be there at 10 o\'clock."',
    "There are 7 days in a week and 12 months in a year.",
    "In 1969, two people walked on the Moon for the first time.",
    "Water boils at 100 degrees and freezes at 0 degrees.",
    "What is the answer? It is 42, of course!",
    "My phone number is 555-0123, please call me after 6 pm.",
    "The price was $3.50 for one apple and $7.00 for two.",
    "Good morning! How are you today?",
    "I am fine, thank you. And you?",
    "translate English to German: The house is wonderful.",
    "Das Haus ist wunderbar.",
    "translate English to French: The cat sits on the table.",
    "Le chat est sur la table.",
    "translate English to Spanish: Where is the train station?",
    "¿Dónde está la estación de tren?",
    "The weather is nice today, but it may rain tomorrow.",
    "Dogs and cats are the most common pets in many homes.",
    "The first rule of testing: never trust a model you have not checked.",
    "Attention is all you need, or so they say.",
    "He wrote 3 letters, 2 emails and 1 short note.",
    "Numbers like 8, 9, 10 and 11 are easy to count.",
    "The river flows from the mountains to the sea.",
    "Can you tell me the way to the museum?",
    "Turn left at the bank, then walk 200 meters.",
    "Science is the study of the natural world.",
    "The teacher asked the students to read the book.",
    "Every morning she drinks a cup of tea with milk.",
    "The meeting starts at 9:30 and ends at 11:15.",
    "Summer is warm, winter is cold (usually).",
    "Books, pens, and papers were on the desk.",
    "He smiled and said: hello, my friend!",
    "The sun rises in the east and sets in the west.",
    "A journey of a thousand miles begins with a single step.",
    "Learning a new language takes time, patience and practice.",
    "The children played in the park until 5 o'clock.",
    "Is this the end of the story? No, it is only the beginning.",
]

BYTE_LEVEL = ("gpt2", "gpt_neox", "qwen2", "opt", "bart")  # the others use the SentencePiece "▁" style

# (single, pair) post-processing templates, as the real tokenizers add special tokens.
TEMPLATES = {
    "llama": ("<s> $A", "<s> $A <s> $B"),
    "opt": ("<s> $A", "<s> $A <s> $B"),
    "bart": ("<s> $A </s>", "<s> $A </s> </s> $B </s>"),
    "t5": ("$A </s>", "$A </s> $B </s>"),
    "marian": ("$A </s>", "$A </s> $B </s>"),
}


@functools.lru_cache(maxsize=None)
def _trained_backend(byte_level: bool) -> Tokenizer:
    """`_trained_backend(False).encode("Hello world").tokens == ["▁H", "ello", "▁world"]`: trained once a style."""
    specials = list(SPECIAL_TOKENS.values())
    if byte_level:
        # All 256 byte symbols, so any text round-trips, plus 124 merges: hence 384 rather than ~250 entries.
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=384,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        backend = Tokenizer(models.Unigram())
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=250, special_tokens=specials, unk_token=SPECIAL_TOKENS["unk_token"], show_progress=False
        )
    backend.train_from_iterator(CORPUS, trainer)
    return backend


def tiny_tokenizer(arch: str) -> transformers.PreTrainedTokenizerFast:
    """`tiny_tokenizer("t5")("Hello world").input_ids` ends with `</s>`: a fresh tokenizer in the style of `arch`."""
    if arch not in ALL_ARCHS:
        raise ValueError(f"Unknown arch {arch!r}; expected one of {ALL_ARCHS}")
    byte_level = arch in BYTE_LEVEL
    backend = Tokenizer.from_str(_trained_backend(byte_level).to_str())
    if arch in TEMPLATES:
        single, pair = TEMPLATES[arch]
        specials = [(token, backend.token_to_id(token)) for token in ("<s>", "</s>")]
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    elif byte_level:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=MAX_POSITIONS,
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
        **SPECIAL_TOKENS,
    )


def _config(arch: str, tokenizer, attn_implementation: str):
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        unk_token_id=tokenizer.unk_token_id,
        attn_implementation=attn_implementation,
    )
    decoder_only = dict(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=MAX_POSITIONS
    )
    seq2seq = dict(
        d_model=HIDDEN,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN,
        max_position_embeddings=MAX_POSITIONS,
        forced_eos_token_id=tokenizer.eos_token_id,
    )
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=MAX_POSITIONS, **common
        )
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(intermediate_size=FFN, **decoder_only, **common)
    if arch == "llama":
        return transformers.LlamaConfig(intermediate_size=FFN, num_key_value_heads=KV_HEADS, **decoder_only, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(intermediate_size=FFN, num_key_value_heads=KV_HEADS, **decoder_only, **common)
    if arch == "opt":
        # word_embed_proj_dim == hidden size: no project_in / project_out layers, as in most OPT sizes.
        return transformers.OPTConfig(ffn_dim=FFN, word_embed_proj_dim=HIDDEN, **decoder_only, **common)
    if arch == "marian":
        # Like the opus-mt checkpoints: decoding starts from <pad>, scaled embeddings, swish activation.
        return transformers.MarianConfig(
            decoder_start_token_id=tokenizer.pad_token_id,
            scale_embedding=True,
            activation_function="swish",
            **seq2seq,
            **common,
        )
    if arch == "bart":
        return transformers.BartConfig(decoder_start_token_id=tokenizer.eos_token_id, **seq2seq, **common)
    if arch == "t5":
        return transformers.T5Config(
            d_model=HIDDEN,
            d_kv=HIDDEN // HEADS,
            d_ff=FFN,
            num_layers=LAYERS,
            num_decoder_layers=LAYERS,
            num_heads=HEADS,
            decoder_start_token_id=tokenizer.pad_token_id,
            **common,
        )
    raise ValueError(f"Unknown arch {arch!r}; expected one of {ALL_ARCHS}")


MODEL_CLASSES = {
    "gpt2": "GPT2LMHeadModel",
    "gpt_neox": "GPTNeoXForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "opt": "OPTForCausalLM",
    "marian": "MarianMTModel",
    "t5": "T5ForConditionalGeneration",
    "bart": "BartForConditionalGeneration",
}


def tiny_model(arch: str, seed: int = 0, attn_implementation: str = "eager"):
    """`model, tokenizer = tiny_model("gpt2", seed=0)`: a fresh random float32 CPU model in eval mode.

    Its weights depend only on `seed`; `attn_implementation` is "eager" or "sdpa"; the tokenizer is fresh too.
    """
    tokenizer = tiny_tokenizer(arch)
    config = _config(arch, tokenizer, attn_implementation)
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[arch])(config)
    return model.to(dtype=torch.float32).eval(), tokenizer


def inseq_comparable(arch: str, seed: int = 0):
    """`tiny_model(arch, seed)`, but a Marian's embedding scale is 1, so that Inseq 0.7.1 runs the same model.

    Inseq feeds `embedding(ids) * embed_scale` as `inputs_embeds`, and under transformers 5 Marian's decoder
    scales `inputs_embeds` once more (its encoder does not): with a scale, Inseq's decoder is not the model's.
    """
    model, tokenizer = tiny_model(arch, seed)
    if arch == "marian":
        model.model.encoder.embed_scale = model.model.decoder.embed_scale = 1.0
    return model, tokenizer
