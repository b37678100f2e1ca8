import gc
import weakref

import pytest
import torch
from torch import nn

import instrument
from instrument.selection import UnknownModuleError, select_modules

from tiny_models import ALL_ARCHS, tiny_model

SELECTED = ["embeddings", "layers", "attention", "mlp", "lm_head"]


def batch_for(model, tokenizer):
    batch = dict(tokenizer(["The capital of France is Paris.", "Hello world"], padding=True, return_tensors="pt"))
    if model.config.is_encoder_decoder:
        target = tokenizer(text_target=["Hello world, this is", "a test"], padding=True, return_tensors="pt")
        batch["decoder_input_ids"] = target["input_ids"]
    return batch


def root_of(output):
    return output.logits[:, -1].log_softmax(-1).max(-1).values.sum()


def hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()]


def plain_capture(model, names, batch):
    """Outputs of `names` seen by ordinary forward hooks, and autograd.grad of the root w.r.t. them."""
    seen = {}

    def keeper(name):
        def hook(module, args, out):
            seen.setdefault(name, out if torch.is_tensor(out) else out[0])

        return hook

    handles = [model.get_submodule(name).register_forward_hook(keeper(name)) for name in names]
    try:
        output = model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    wanted = [name for name in names if seen[name].requires_grad]
    grads = torch.autograd.grad(root_of(output), [seen[name] for name in wanted], allow_unused=True)
    return output, seen, dict(zip(wanted, grads))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_captures_equal_plain_hooks_and_autograd(arch):
    model, tokenizer = tiny_model(arch)
    batch = batch_for(model, tokenizer)
    names = select_modules(model, SELECTED)
    reference, seen, expected_grads = plain_capture(model, names, batch)
    with instrument.trace(model, SELECTED, grads=True) as t:
        output = model(**batch)
        root_of(output).backward()
    assert torch.equal(output.logits, reference.logits)
    assert set(t.activations) == set(names)
    for name in names:
        assert torch.equal(t.activations[name], seen[name].detach()), name
    for name, grad in expected_grads.items():
        if grad is None:
            assert name not in t.gradients
        else:
            assert torch.equal(t.gradients[name], grad), name
    assert t.names[0] in select_modules(model, "embeddings")


@pytest.mark.parametrize("arch", ["gpt2", "bart", "t5"])
def test_hooks_removed_on_exit_error_and_bad_names(arch):
    model, tokenizer = tiny_model(arch)
    batch = batch_for(model, tokenizer)
    before = hook_counts(model)
    with pytest.warns(UserWarning, match="no backward"):
        with instrument.trace(model, SELECTED, grads=True, patch={"mlp": lambda x: x}):
            model(**batch)
    assert hook_counts(model) == before
    with pytest.raises(ZeroDivisionError):
        with instrument.trace(model, "layers", grads=True):
            model(**batch)
            1 / 0
    assert hook_counts(model) == before
    with pytest.raises(UnknownModuleError, match="Close matches"):
        instrument.trace(model, ["layers", "lm_haed"])
    assert hook_counts(model) == before


def test_only_its_own_hooks_are_removed_and_nesting_works():
    model, tokenizer = tiny_model("gpt2")
    batch = batch_for(model, tokenizer)
    foreign = []
    handle = model.lm_head.register_forward_hook(lambda m, a, o: foreign.append(o))
    try:
        with instrument.trace(model, "lm_head") as outer:
            with instrument.trace(model, ["lm_head", "layers"]) as inner:
                model(**batch)
            model(**batch)
        assert len(model.lm_head._forward_hooks) == 1
        assert len(foreign) == 2
        assert torch.equal(inner.activations["lm_head"], outer.activations["lm_head"])
        assert set(inner.activations) == {"lm_head", "transformer.h.0", "transformer.h.1"}
    finally:
        handle.remove()


def test_trace_holds_the_only_references():
    model, tokenizer = tiny_model("llama")
    batch = batch_for(model, tokenizer)
    with instrument.trace(model, "layers", grads=True) as t:
        output = model(**batch)
        root_of(output).backward()
    refs = [weakref.ref(tensor) for tensor in list(t.activations.values()) + list(t.gradients.values())]
    del t
    gc.collect()
    assert refs and all(ref() is None for ref in refs)
    del output


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_outputs_bit_identical_with_trace(arch):
    model, tokenizer = tiny_model(arch)
    batch = batch_for(model, tokenizer)
    plain = model(**batch)
    with pytest.warns(UserWarning, match="no backward"):
        with instrument.trace(model, SELECTED, grads=True, inputs=True):
            traced = model(**batch)
    assert type(traced) is type(plain)
    assert torch.equal(plain.logits, traced.logits)


def test_reduce_over_many_calls_matches_stored_statistics_in_constant_memory():
    model, tokenizer = tiny_model("gpt2")
    batches = [dict(tokenizer([f"Hello world {i} times"], return_tensors="pt")) for i in range(100)]
    expected = {}
    with instrument.trace(model, "layers", reduce="grad_x_act_norm") as t:
        for index, batch in enumerate(batches):
            root_of(model(**batch)).backward()
            if index == 9:
                tensors_at_10 = sum(torch.is_tensor(obj) for obj in gc.get_objects())
        tensors_at_100 = sum(torch.is_tensor(obj) for obj in gc.get_objects())
    assert not t.activations and not t.gradients
    assert tensors_at_100 <= tensors_at_10
    for batch in batches:
        with instrument.trace(model, "layers", grads=True) as stored:
            root_of(model(**batch)).backward()
        for name in stored.activations:
            value = (stored.gradients[name] * stored.activations[name]).norm(dim=-1).mean()
            expected[name] = expected.get(name, 0) + value / len(batches)
    assert t.calls == {name: 100 for name in expected}
    for name, value in expected.items():
        torch.testing.assert_close(t.stats[name], value, rtol=1e-5, atol=0)


def test_reduce_without_gradients_and_custom_function():
    model, tokenizer = tiny_model("qwen2")
    batch = batch_for(model, tokenizer)
    with torch.no_grad():
        with instrument.trace(model, "mlp", reduce="norm") as by_name:
            model(**batch)
            model(**batch)
        with instrument.trace(model, "mlp", reduce=lambda act, grad: act.abs().amax(), store=True) as custom:
            model(**batch)
    for name, act in custom.activations.items():
        torch.testing.assert_close(by_name.stats[name], act.norm(dim=-1).mean(), rtol=1e-6, atol=0)
        torch.testing.assert_close(custom.stats[name], act.abs().amax())
    with pytest.raises(ValueError, match="Unknown reduction"):
        instrument.trace(model, "mlp", reduce="nrm")


def test_no_grad_captures_activations_only_and_warns():
    model, tokenizer = tiny_model("opt")
    with pytest.warns(UserWarning, match=r"torch.no_grad\(\)"):
        with torch.no_grad(), instrument.trace(model, "layers", grads=True) as t:
            model(**batch_for(model, tokenizer))
    assert len(t.activations) == 2 and not t.gradients


class InPlaceNet(nn.Module):
    def __init__(self, inplace: bool):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(5, 6), nn.Linear(6, 3)
        self.inplace = inplace

    def forward(self, x):
        hidden = self.first(x)
        if self.inplace:
            hidden.mul_(2)  # modifies the hooked module's output in place
            return self.second(hidden.relu_())
        return self.second((hidden * 2).relu())


def test_inplace_ops_after_hooked_module_keep_activation_and_gradient():
    x = torch.randn(4, 5)
    reference = InPlaceNet(inplace=False)
    hidden = reference.first(x)
    expected_grad = torch.autograd.grad(reference.second((hidden * 2).relu()).sum(), hidden)[0]
    model = InPlaceNet(inplace=True)
    with instrument.trace(model, "first", grads=True) as t:
        model(x).sum().backward()
    assert torch.equal(t.activations["first"], hidden.detach())
    torch.testing.assert_close(t.gradients["first"], expected_grad, rtol=0, atol=0)


def test_patch_replaces_output_and_keeps_structure():
    model, tokenizer = tiny_model("gpt2")
    batch = batch_for(model, tokenizer)
    block_outputs = []
    handle = model.transformer.h[0].register_forward_hook(lambda m, a, o: block_outputs.append(o))
    try:
        with instrument.trace(model, patch={"transformer.h.0.mlp": torch.zeros(())}) as t:
            patched = model(**batch)
    finally:
        handle.remove()
    assert not t.activations
    assert type(block_outputs[0]) is type(model.transformer.h[0](model.transformer.wte(batch["input_ids"])))

    def zero_mlp(module, args, out):
        return torch.zeros_like(out)

    handle = model.transformer.h[0].mlp.register_forward_hook(zero_mlp)
    try:
        expected = model(**batch)
    finally:
        handle.remove()
    assert torch.equal(patched.logits, expected.logits)
    with instrument.trace(model, "layers", patch={"layers": lambda h: h * 1.0}) as t:
        same = model(**batch)
    assert torch.equal(same.logits, model(**batch).logits)


def test_module_called_twice_in_one_forward_keeps_both_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)

        def forward(self, x):
            return self.inner(self.inner(x))

    model, x = Twice(), torch.randn(2, 3)
    with instrument.trace(model, "inner") as t:
        model(x)
        model(x)
    assert set(t.activations) == {"inner", "inner:1"}
    torch.testing.assert_close(t.activations["inner:1"], model(x).detach())


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gradient_checkpointing_captures_each_module_once(arch, reentrant):
    model, tokenizer = tiny_model(arch)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    batch = batch_for(model, tokenizer)
    with instrument.trace(model, "mlp", grads=True) as plain:
        root_of(model(**batch)).backward()
    model.train()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    forwards = []
    handle = model.get_submodule(plain.names[0]).register_forward_hook(lambda *a: forwards.append(1))
    try:
        with instrument.trace(model, "mlp", grads=True) as checkpointed:
            root_of(model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])).backward()
    finally:
        handle.remove()
    if reentrant:  # non-reentrant recomputation may stop early, before reaching this module
        assert len(forwards) == 2  # the module really ran twice (forward, then recomputed in backward)
    assert set(checkpointed.activations) == set(plain.activations)
    for name in plain.activations:
        torch.testing.assert_close(checkpointed.activations[name], plain.activations[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(checkpointed.gradients[name], plain.gradients[name], rtol=1e-5, atol=1e-6)


def test_inputs_device_and_dtype_options():
    model, tokenizer = tiny_model("gpt_neox")
    batch = batch_for(model, tokenizer)
    seen = {}

    def keep_input(module, args, kwargs):
        seen["in"] = args[0] if args else kwargs["hidden_states"]

    handle = model.gpt_neox.layers[1].register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        with instrument.trace(model, "layers", inputs=True, dtype=torch.float16, device="cpu") as t:
            model(**batch)
    finally:
        handle.remove()
    assert t.activations["gpt_neox.layers.1"].dtype == torch.float16
    assert torch.equal(t.inputs["gpt_neox.layers.1"], seen["in"].detach().half())
