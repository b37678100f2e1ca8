"""Long prompts: time and peak memory of attributing 32 generated tokens after a prompt of 256 to
4,000 tokens, ours against Inseq, on a GPT-2-small-shaped model (transformers' GPT2Config defaults,
seeded random weights, its default attention implementation).

    PYTHONPATH=. python benchmarks/long_context.py                                   # the full grid
    PYTHONPATH=. python benchmarks/long_context.py --lengths 1000 --methods saliency
    PYTHONPATH=. python benchmarks/long_context.py --lengths 4000 --methods saliency --runners ours,bare
    # a lent GPU: a 7B-parameter-shaped Llama (random weights) in bf16, 8-bit or 4-bit (bitsandbytes)
    python benchmarks/long_context.py --device cuda --model llama-7b --dtype bfloat16 --lengths 2000,8000 \
        --methods saliency,integrated_gradients --runners ours,inseq,bare
    python benchmarks/long_context.py --device cuda --model llama-7b --quantization 4bit --lengths 16000 \
        --methods attention,value_zeroing --runners ours,inseq

Texts: a word-level tokenizer over 998 made-up words, so that a prompt of N words is N tokens; the 32
forced continuation tokens follow it. Methods: saliency, integrated gradients (20 steps), attention,
occlusion. Runners: `ours`, `inseq` (skipped past `--inseq-max` tokens, or where it is not installed),
`bare`: one forward of the whole sequence and one backward of the last token's probability to the
input embeddings (the floor a gradient method's memory is compared with), and `frozen`: the same with
no parameter requiring grad and logits at the last positions only (the leanest floor). Each (runner, method, length)
runs in a fresh subprocess, runners interleaved per setting; measured there: the wall time and the
process's CPU time (all threads; steadier than wall time on a shared machine) of the one call, and
the peak resident memory growth over it (VmHWM after resetting it through /proc/self/clear_refs,
minus VmRSS before the call; on CUDA, `max_memory_allocated` above what was allocated before). Prints
one Markdown table row per setting. `--model llama-tiny` (2 layers, 64 wide) checks the options on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import warnings

# Run as a script, this folder comes first on sys.path, where kernels.py would shadow the `kernels` package.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != HERE]

GENERATED = 32
WORDS = 998


SHAPES = {
    "gpt2-small": {},
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}


def build(length: int, setting: dict, generated: int = GENERATED):
    """(model, tokenizer, prompt, prompt + continuation) for a prompt of `length` tokens; `setting`:
    model shape, device, dtype and quantization (a random checkpoint saved, then loaded quantized)."""
    import tempfile

    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", bos_token="<eos>", pad_token="<eos>"
    )
    torch.manual_seed(0)
    positions = max(1024, length + generated)
    ids = dict(bos_token_id=1, eos_token_id=1, pad_token_id=1)
    if setting["model"] == "gpt2-small":
        config, cls = transformers.GPT2Config(n_positions=positions, **ids), transformers.GPT2LMHeadModel
    else:
        shape = SHAPES[setting["model"]]
        config = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=positions, **shape, **ids)
        cls = transformers.LlamaForCausalLM
    dtype = getattr(torch, setting["dtype"])
    with torch.device(setting["device"]):
        model = cls(config).to(dtype).eval()
    if setting["quantization"] != "none":
        quantization = transformers.BitsAndBytesConfig(
            load_in_8bit=setting["quantization"] == "8bit",
            load_in_4bit=setting["quantization"] == "4bit",
            bnb_4bit_compute_dtype=dtype,
        )
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            del model
            model = cls.from_pretrained(
                folder, quantization_config=quantization, device_map=setting["device"], dtype=dtype
            ).eval()
    generator = torch.Generator().manual_seed(1)
    words = [f"w{int(i)}" for i in torch.randint(0, WORDS, (length + generated,), generator=generator)]
    return model, tokenizer, " ".join(words[:length]), " ".join(words)


OPTIONS = {"integrated_gradients": {"n_steps": 20}}


def run_one(runner: str, method: str, length: int, setting: dict) -> dict:
    """Runs one setting in this process; returns wall and CPU seconds and peak memory growth (bytes)."""
    import torch

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    model, tokenizer, prompt, full = build(length, setting)
    device = torch.device(setting["device"])
    if runner == "ours":
        import instrument

        wrapped = instrument.load_model(model, method, tokenizer=tokenizer)

        def call():
            return wrapped.attribute(prompt, full, show_progress=False, **OPTIONS.get(method, {}))
    elif runner == "inseq":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import inseq
        if method == "attention":
            model.set_attn_implementation("eager")  # Inseq reads output.attentions
        wrapped = inseq.load_model(model, method, tokenizer=copy.deepcopy(tokenizer), device=str(device))

        def call():
            return wrapped.attribute(prompt, full, show_progress=False, **OPTIONS.get(method, {}))
    else:  # bare / frozen: one forward and one input-gradient backward
        ids = tokenizer(full, return_tensors="pt")["input_ids"].to(device)
        embedding = model.get_input_embeddings()
        kept = {}
        if runner == "frozen":  # the leanest floor: no parameter requires grad, logits at one position
            model.requires_grad_(False)
            kept = {"logits_to_keep": 2}

        def call():
            with torch.enable_grad():
                embeds = embedding(ids).detach().requires_grad_()
                logits = model(inputs_embeds=embeds, use_cache=False, **kept).logits[0, -2]
                return torch.autograd.grad(logits.softmax(-1)[ids[0, -1]], embeds)[0]

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        from instrument.memory import _read_status, _reset_cpu_peak, _trim

        _trim()
        _reset_cpu_peak()
        before = _read_status("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _read_status("VmHWM") - before
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": seconds, "cpu": cpu, "peak": peak}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,1000,2000,4000")
    parser.add_argument("--methods", default="saliency,integrated_gradients,attention,occlusion")
    parser.add_argument("--runners", default="ours,inseq,bare")
    parser.add_argument("--inseq-max", type=int, default=2000, help="longest prompt Inseq runs on")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    parser.add_argument("--model", default="gpt2-small", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--quantization", default="none", choices=["none", "8bit", "4bit"])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # runner:method:length, in the child
    args = parser.parse_args(argv)
    setting = {k: getattr(args, k) for k in ("model", "device", "dtype", "quantization")}
    if args.one:
        runner, method, length = args.one.split(":")
        print(json.dumps(run_one(runner, method, int(length), setting)))
        return
    print(f"{setting['model']} on {setting['device']}, {setting['dtype']}, quantization {setting['quantization']}")
    print("| prompt tokens | method | runner | wall s | CPU s | peak memory growth (GiB) |")
    print("|---|---|---|---|---|---|")
    for length in map(int, args.lengths.split(",")):
        for method in args.methods.split(","):
            for runner in args.runners.split(","):
                if runner in ("bare", "frozen") and method != "saliency":
                    continue
                if runner == "inseq" and length > args.inseq_max:
                    print(f"| {length} | {method} | inseq | not run (> {args.inseq_max} tokens) | |", flush=True)
                    continue
                command = [sys.executable, __file__, "--one", f"{runner}:{method}:{length}"]
                command += [f"--{k}={v}" for k, v in setting.items()]
                try:
                    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    print(f"| {length} | {method} | {runner} | > {args.timeout} (stopped) | |", flush=True)
                    continue
                if done.returncode != 0:
                    why = (done.stderr.strip().splitlines() or ["?"])[-1][:100]
                    print(f"| {length} | {method} | {runner} | failed: {why} | |", flush=True)
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                print(
                    f"| {length} | {method} | {runner} | {result['seconds']:.1f} | {result['cpu']:.1f} "
                    f"| {result['peak'] / 2**30:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
