import time

import pytest
import torch

from tiny_models import ALL_ARCHS, BYTE_LEVEL, DECODER_ONLY, ENCODER_DECODER, tiny_model

TEXTS = ["The capital of France is Paris.", "Hello world"]
TARGETS = ["Le chat est sur la table.", "Das Haus"]


def test_arch_lists():
    assert DECODER_ONLY == ("gpt2", "gpt_neox", "llama", "qwen2", "opt")
    assert ENCODER_DECODER == ("marian", "t5", "bart")
    assert ALL_ARCHS == DECODER_ONLY + ENCODER_DECODER


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_forward_on_padded_batch(arch, attn_implementation):
    model, tokenizer = tiny_model(arch, attn_implementation=attn_implementation)
    assert not model.training and model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.config._attn_implementation == attn_implementation
    assert model.config.is_encoder_decoder == (arch in ENCODER_DECODER)
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    assert set(batch) == {"input_ids", "attention_mask"}
    short = int(batch["attention_mask"][1].sum())
    assert short < batch["input_ids"].shape[1]  # the second text really is right-padded
    assert (batch["input_ids"][1, short:] == tokenizer.pad_token_id).all()
    single = dict(tokenizer(TEXTS[1:], return_tensors="pt"))
    if model.config.is_encoder_decoder:
        batch["labels"] = tokenizer(text_target=TARGETS, padding=True, return_tensors="pt")["input_ids"]
        single["labels"] = tokenizer(text_target=TARGETS[1:], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        output = model(**batch)
        alone = model(**single)
    length = batch["labels" if model.config.is_encoder_decoder else "input_ids"].shape[1]
    assert output.logits.shape == (2, length, len(tokenizer))
    assert torch.isfinite(output.logits).all()
    if model.config.is_encoder_decoder:
        assert torch.isfinite(output.loss)
    # Padding must not change the shorter text's logits: the attention mask and pad id are wired up.
    valid = alone.logits.shape[1]
    torch.testing.assert_close(output.logits[1, :valid], alone.logits[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_generate_greedy(arch):
    model, tokenizer = tiny_model(arch)
    if arch in DECODER_ONLY:
        tokenizer.padding_side = "left"  # what batched generation with decoder-only models needs
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    if arch in DECODER_ONLY:
        prompt = batch["input_ids"].shape[1]
        assert prompt < generated.shape[1] <= prompt + 3
        assert torch.equal(generated[:, :prompt], batch["input_ids"])
    else:
        assert 1 < generated.shape[1] <= 4
        assert (generated[:, 0] == model.config.decoder_start_token_id).all()


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_tokenizer_style_and_special_tokens(arch):
    model, tokenizer = tiny_model(arch)
    marker = "Ġ" if arch in BYTE_LEVEL else "▁"
    assert any(marker in token for token in tokenizer.tokenize("hello world"))
    sentence = "The capital of Germany is Berlin, and the weather is nice today."
    assert tokenizer.decode(tokenizer.encode(sentence), skip_special_tokens=True) == sentence
    if arch in BYTE_LEVEL:
        unseen = "Zürich, 2024 ✓ {x: 7}"
        assert tokenizer.decode(tokenizer.encode(unseen), skip_special_tokens=True) == unseen
    assert tokenizer.padding_side == "right" and tokenizer.model_max_length >= 128
    ids = tokenizer("Hello world")["input_ids"]
    starts_with_bos = ids[0] == tokenizer.bos_token_id
    ends_with_eos = ids[-1] == tokenizer.eos_token_id
    assert starts_with_bos == (arch in ("llama", "opt", "bart"))
    assert ends_with_eos == (arch in ENCODER_DECODER)
    config = model.config
    assert config.vocab_size == len(tokenizer) == model.get_input_embeddings().num_embeddings
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(config, f"{name}_token_id") == getattr(tokenizer, f"{name}_token_id"), name
    if arch in ENCODER_DECODER:
        start = tokenizer.eos_token_id if arch == "bart" else tokenizer.pad_token_id
        assert config.decoder_start_token_id == start


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_sizes(arch):
    model, _ = tiny_model(arch)
    config = model.config
    assert config.hidden_size == 32 and config.num_attention_heads == 4 and config.num_hidden_layers == 2
    if arch in ENCODER_DECODER:
        decoder_layers = config.num_decoder_layers if arch == "t5" else config.decoder_layers
        assert decoder_layers == 2
    if arch in ("llama", "qwen2"):
        assert config.num_key_value_heads == 2
    assert sum(parameter.numel() for parameter in model.parameters()) < 100_000


@pytest.mark.parametrize("arch", ["gpt2", "opt", "marian", "t5", "bart"])
def test_default_dropout_is_kept_and_off_in_eval(arch):
    model, tokenizer = tiny_model(arch)
    batch = tokenizer(TEXTS[:1], return_tensors="pt")
    if model.config.is_encoder_decoder:
        batch["decoder_input_ids"] = tokenizer(text_target=TARGETS[:1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model(**batch).logits)
        model.train()
        assert not torch.equal(model(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_fast_fresh_and_seeded(arch):
    tiny_model(arch)  # trains the tokenizer and imports the model code
    start = time.perf_counter()
    model, tokenizer = tiny_model(arch)
    elapsed = time.perf_counter() - start
    print(f"{arch}: tiny_model took {elapsed * 1000:.1f} ms")
    assert elapsed < 2.0
    tokenizer.padding_side = "left"
    again, other_tokenizer = tiny_model(arch)
    assert again is not model and other_tokenizer.padding_side == "right"
    state, same = model.state_dict(), again.state_dict()
    assert all(torch.equal(state[name], same[name]) for name in state)
    different = tiny_model(arch, seed=1)[0].state_dict()
    assert not all(torch.equal(state[name], different[name]) for name in state)
