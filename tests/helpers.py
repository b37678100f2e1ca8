"""Helpers shared by the test modules: example texts, a NaN-aware comparison, and a float64 case
with the attributed function written out for Captum.

    from helpers import SOURCES, TRANSLATIONS, assert_same, Case
    case = Case("gpt2"); seq = case.attribute("saliency")
"""

import contextlib

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import instrument

from tiny_models import tiny_model

# Three examples of different lengths, short enough for the step-by-step reference on 2 cores.
SOURCES = ["Hello world", "The capital of France is", "Good morning!"]
DECODER_TARGETS = ["Hello world, this", "The capital of France is Paris.", "Good morning! How"]
TRANSLATIONS = ["Das Haus", "Le chat est", "Hello"]


def assert_same(batched, reference, atol=1e-5, scale=None):
    """Equal where defined, within `atol` relative to `scale` (default: the largest magnitude), NaN in the
    same places."""
    if reference is None:
        assert batched is None
        return
    assert batched.shape == reference.shape
    assert torch.equal(batched.isnan(), reference.isnan())
    scale = reference.nan_to_num().abs().max().clamp_min(1e-30) if scale is None else scale
    torch.testing.assert_close(batched.nan_to_num() / scale, reference.nan_to_num() / scale, rtol=0, atol=atol)


def double_model(arch, attn_implementation="eager"):
    model, tokenizer = tiny_model(arch, attn_implementation=attn_implementation)
    return model.double(), tokenizer


class TextCase:
    """A wrapped model and one (source, target) example: token ids, attributed steps, embedding modules.

    case = TextCase(model, tokenizer, "Hello world", "Le chat"); case.attribute("saliency")
    """

    def __init__(self, model, tokenizer, source, target):
        self.model, self.tok = model, tokenizer
        self.am = instrument.load_model(model, tokenizer=tokenizer)
        self.enc_dec = bool(model.config.is_encoder_decoder)
        self.texts = (source, target)
        if self.enc_dec:
            self.source = torch.tensor(tokenizer(source)["input_ids"])
            start = model.config.decoder_start_token_id
            self.target = torch.tensor([start, *tokenizer(text_target=target)["input_ids"]])
            self.steps = list(range(1, len(self.target)))
            self.src_emb = model.get_encoder().get_input_embeddings()
            self.tgt_emb = model.get_decoder().get_input_embeddings()
        else:
            self.source = None
            self.target = torch.tensor(tokenizer(target)["input_ids"])
            self.steps = list(range(len(tokenizer(source)["input_ids"]), len(self.target)))
            self.src_emb, self.tgt_emb = None, model.get_input_embeddings()

    def attribute(self, method, **kwargs):
        return self.am.attribute(*self.texts, method=method, show_progress=False, **kwargs)[0]


class Case(TextCase):
    """One float64 tiny model, one example, and the attributed function of each step for Captum:
    `f(*embeds) = p(target[p] | prefix)` with the embedding modules' outputs replaced."""

    TEXTS = {
        "gpt2": ("Hello world", "Hello world, this is"),
        "llama": ("Hello world", "Hello world, this is"),
        "bart": ("Hello world", "Le chat"),
        "t5": ("Hello world", "Le chat"),
    }

    def __init__(self, arch, attn_implementation="eager"):
        super().__init__(*double_model(arch, attn_implementation), *self.TEXTS[arch])

    def sides(self, attribute_target):
        if not self.enc_dec:
            return ["target"]
        return ["source", "target"] if attribute_target else ["source"]

    @torch.no_grad()
    def embeds(self, p, attribute_target, baseline_id=None):
        """Inputs (and baselines made of `baseline_id`, EOS kept) Captum attributes at step p."""

        def base(ids):
            return torch.where(ids == self.tok.eos_token_id, ids, torch.full_like(ids, baseline_id))

        prefix = self.target[:p][None]
        sides = (
            [(self.tgt_emb, prefix)]
            if not self.enc_dec
            else [(self.src_emb, self.source[None])] + ([(self.tgt_emb, prefix)] if attribute_target else [])
        )
        inputs = tuple(emb(ids) for emb, ids in sides)
        if baseline_id is None:
            return inputs, None
        bases = [base(ids) for _, ids in sides]
        if self.enc_dec and attribute_target:  # the decoder start token is kept (Inseq's rule)
            bases[1][:, 0] = prefix[:, 0]
        return inputs, tuple(emb(b) for (emb, _), b in zip(sides, bases))

    def logits(self, n, p, src_embeds=None, tgt_embeds=None):
        tgt_ids = self.target[:p].expand(n, -1)
        with contextlib.ExitStack() as stack:
            for module, value in ((self.src_emb, src_embeds), (self.tgt_emb, tgt_embeds)):
                if value is not None:
                    stack.callback(module.register_forward_hook(lambda m, a, o, value=value: value).remove)
            if self.enc_dec:
                src_ids = self.source.expand(n, -1)
                return self.model(input_ids=src_ids, decoder_input_ids=tgt_ids).logits[:, -1]
            return self.model(input_ids=tgt_ids).logits[:, -1]

    def prob_fn(self, p, attribute_target=False):
        token = int(self.target[p])

        def f(*embeds):
            n = embeds[0].shape[0]
            if self.enc_dec:
                logits = self.logits(n, p, src_embeds=embeds[0], tgt_embeds=embeds[1] if attribute_target else None)
            else:
                logits = self.logits(n, p, tgt_embeds=embeds[0])
            return logits.float().softmax(-1)[:, token]  # float32 softmax, as the library's step function

        return f

    def ours(self, seq, j, p, side):
        return seq.source_attributions[:, j] if side == "source" else seq.target_attributions[:p, j]


def close(actual, expected, rtol=1e-6):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    atol = 1e-6 * float(expected.abs().max())
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


# -- the planner's small GPT-2 and word-level texts (a prompt of N words is N tokens) --

WORDS = 200


def word_tokenizer():
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", bos_token="<eos>", pad_token="<eos>"
    )


def small_gpt2(attention="sdpa", hidden=64):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=hidden, n_layer=2, n_head=4, vocab_size=WORDS + 2, n_positions=512, bos_token_id=1, eos_token_id=1
    )
    config.pad_token_id = 1
    model = transformers.GPT2LMHeadModel(config).eval()
    model.set_attn_implementation(attention)
    return model


def texts(length, generated):
    words = [f"w{(7 * i) % WORDS}" for i in range(length + generated)]
    return " ".join(words[:length]), " ".join(words)
