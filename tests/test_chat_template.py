"""Chat-template prompts on decoder-only models (Inseq #270/#278): the template writes the BOS token
itself, so tokenizing its text with special tokens would give two; the attributed ids must be exactly
the chat-formatted ids followed by the continuation's."""

import copy
import warnings

import pytest
import torch

import instrument

from tiny_models import tiny_model

TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
CONTINUATION = " Paris."


@pytest.fixture(scope="module")
def chat():
    model, tokenizer = tiny_model("llama")
    tokenizer.chat_template = TEMPLATE
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert prompt.startswith(tokenizer.bos_token) and ids[0] == tokenizer.bos_token_id != ids[1]
    assert tokenizer(prompt)["input_ids"][:2] == [tokenizer.bos_token_id] * 2  # the duplicated-BOS case is real
    return model, tokenizer, prompt, ids


def test_chat_prompt_text_attributes_the_chat_ids(chat):
    model, tokenizer, prompt, ids = chat
    am = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    seq = am.attribute(prompt, prompt + CONTINUATION, show_progress=False, step_scores=["probability"])[0]
    target = [t.id for t in seq.target]
    assert target[: len(ids)] == ids and target.count(tokenizer.bos_token_id) == 1
    assert target == tokenizer(prompt + CONTINUATION, add_special_tokens=False)["input_ids"]
    assert seq.attr_pos_start == len(ids) and [t.id for t in seq.source] == ids
    # the same ids given directly
    full = ids + target[len(ids) :]
    by_ids = am.attribute(ids, full, show_progress=False, step_scores=["probability"])[0]
    assert [t.id for t in by_ids.target] == target and by_ids.attr_pos_start == len(ids)
    assert by_ids.equals(seq)
    by_tensor = am.attribute(torch.tensor(ids), torch.tensor(full), show_progress=False, step_scores=["probability"])[0]
    assert by_tensor.equals(seq)


def test_chat_prompt_matches_inseq(chat):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inseq = pytest.importorskip("inseq")
    model, tokenizer, prompt, ids = chat
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = inseq.load_model(model, "saliency", tokenizer=copy.deepcopy(tokenizer))
        expected = theirs.attribute(prompt, prompt + CONTINUATION, show_progress=False, step_scores=["probability"])[0]
    seq = instrument.load_model(model, "saliency", tokenizer=tokenizer).attribute(
        prompt, prompt + CONTINUATION, show_progress=False, step_scores=["probability"]
    )[0]
    assert [t.id for t in seq.target] == [t.id for t in expected.target]
    assert [t.token for t in seq.source] == [t.token for t in expected.source]
    torch.testing.assert_close(
        seq.target_attributions, expected.target_attributions, rtol=1e-5, atol=1e-8, equal_nan=True
    )
    torch.testing.assert_close(
        seq.step_scores["probability"], expected.step_scores["probability"], rtol=1e-5, atol=1e-8
    )


def test_skip_special_tokens_as_inseq(chat):
    """Inseq: special tokens are removed from the texts and none are added."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inseq = pytest.importorskip("inseq")
    model, tokenizer, prompt, ids = chat
    seq = instrument.load_model(model, "saliency", tokenizer=tokenizer).attribute(
        prompt, prompt + CONTINUATION, show_progress=False, skip_special_tokens=True
    )[0]
    plain = prompt.replace(tokenizer.bos_token, "")
    assert [t.id for t in seq.target] == tokenizer(plain + CONTINUATION, add_special_tokens=False)["input_ids"]
    assert tokenizer.bos_token_id not in [t.id for t in seq.target]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = inseq.load_model(model, "saliency", tokenizer=copy.deepcopy(tokenizer))
        expected = theirs.attribute(prompt, prompt + CONTINUATION, show_progress=False, skip_special_tokens=True)[0]
    assert [t.id for t in seq.target] == [t.id for t in expected.target]
    torch.testing.assert_close(
        seq.target_attributions, expected.target_attributions, rtol=1e-5, atol=1e-8, equal_nan=True
    )


def test_generation_from_a_chat_prompt(chat):
    model, tokenizer, prompt, ids = chat
    am = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    args = {"max_new_tokens": 3, "do_sample": False}
    encoding = tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    for given in (prompt, ids, encoding):
        seq = am.attribute(given, generation_args=dict(args), show_progress=False)[0]
        target = [t.id for t in seq.target]
        assert target[: len(ids)] == ids and target.count(tokenizer.bos_token_id) == 1
        assert seq.attr_pos_start == len(ids) and len(target) == len(ids) + 3
    with torch.no_grad():
        expected = model.generate(
            torch.tensor([ids]), max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )[0]
    assert target == expected.tolist()


def test_token_id_prompts_need_token_id_targets(chat):
    model, tokenizer, prompt, ids = chat
    am = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    with pytest.raises(TypeError, match="token ids"):
        am.attribute(ids, prompt + CONTINUATION, show_progress=False)
    with pytest.raises(ValueError, match="start with the prompt"):
        am.attribute(ids, [ids[0], ids[2], *ids[1:]], show_progress=False)
