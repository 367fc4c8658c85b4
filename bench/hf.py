"""transformers' ``MambaForCausalLM`` (or ``Mamba2ForCausalLM``) on a CPU: its own code against
``integrations.transformers.install()``.

    python -m bench hf --device cpu [--quick] [--family mamba2] [--d-model 256 --layers 2 --dstate 16 --batch 4
                                                                 --seqlen 256 --new 32]

One randomly initialised model (fp32, untied head; Mamba-2: heads of 64 channels, one B/C group, 64-step chunks),
three groups, each timed round-robin with the integration
switched off (``transformers``: its PyTorch code, the baseline) and on (``compressm``: our kernels):
  * ``train step``: loss on ``(Bt, L)`` tokens, backward (the fused path on our kernels; transformers' own
    path without mamba_ssm is its unfused PyTorch code with a Python loop over tokens) and an AdamW step;
  * ``forward``: eval logits without a cache;
  * ``generate``: greedy ``generate`` of ``--new`` tokens from the first 8 (prefill scan, then decode steps).
CPU only: on other devices the integration leaves transformers' functions in place.
"""

from __future__ import annotations

import argparse
import importlib
import inspect

import torch

from compressm_kernels.integrations import transformers as bridge

from .harness import Bench, publish, with_flags

SIZES = {
    True: dict(d_model=32, layers=1, dstate=8, batch=1, seqlen=16, new=4, warmup=1, repeats=3),
    False: dict(d_model=256, layers=2, dstate=16, batch=4, seqlen=256, new=32, warmup=1, repeats=3),
}
VOCAB = 1024
PROMPT = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", choices=("mamba", "mamba2"), default="mamba")
    p.add_argument("--d-model", dest="d_model", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--dstate", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--seqlen", type=int)
    p.add_argument("--new", type=int, help="tokens generated per generate call")


def run(args: argparse.Namespace) -> Bench:
    if args.device != "cpu":
        raise SystemExit("bench hf: the transformers integration routes CPU tensors only; use --device cpu")
    try:
        import transformers
    except ImportError as err:
        raise SystemExit(f"bench hf needs transformers ({err})") from err
    opt = with_flags(args, SIZES[args.quick])
    transformers.logging.set_verbosity_error()  # its "falling back to PyTorch" notices are the baseline here
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=opt["d_model"], state_size=opt["dstate"],
                  num_hidden_layers=opt["layers"], tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    if args.family == "mamba2":
        head_dim = min(64, 2 * opt["d_model"])
        config = transformers.Mamba2Config(**common, expand=2, head_dim=head_dim,
                                           num_heads=2 * opt["d_model"] // head_dim, n_groups=1, chunk_size=64)
        model = transformers.Mamba2ForCausalLM(config)
    else:
        model = transformers.MambaForCausalLM(transformers.MambaConfig(**common))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (opt["batch"], opt["seqlen"]), generator=torch.Generator().manual_seed(1))

    def train_step():
        model.train()
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def forward():
        model.eval()
        model(ids, use_cache=False)

    @torch.no_grad()
    def generate():
        model.eval()
        model.generate(ids[:, :PROMPT], max_new_tokens=opt["new"], min_new_tokens=opt["new"], do_sample=False)

    # transformers' own code is its PyTorch functions. Its wrappers around them switch to mamba_ssm's kernels once
    # mamba_ssm is importable (after integrations.mamba_ssm.install(), say), and those need CUDA.
    module = importlib.import_module(f"transformers.models.{args.family}.modeling_{args.family}")

    bridge.uninstall()
    wrappers = {name: getattr(module, name) for name in bridge.MODULES[module.__name__]}
    torch_bodies = {name: inspect.unwrap(fn) for name, fn in wrappers.items()}

    def use(functions: dict) -> None:
        bridge.uninstall()
        for name, fn in functions.items():
            setattr(module, name, fn)

    def on(path: str, fn):
        def call():
            use(torch_bodies)
            if path == "compressm":
                bridge.install()
            fn()
        return call

    bench = Bench(f"transformers {type(model).__name__} d_model={opt['d_model']} layers={opt['layers']} "
                  f"N={opt['dstate']} Bt={opt['batch']} L={opt['seqlen']} fp32, generate {opt['new']} tokens, baseline "
                  "transformers' own code",
                  device=args.device, warmup=opt["warmup"], repeats=opt["repeats"])
    try:
        for op, fn in (("train step", train_step), ("forward", forward), ("generate", generate)):
            bench.compare(op, {f"{path} {op}": on(path, fn) for path in ("transformers", "compressm")},
                          baseline=f"transformers {op}",
                          extras={f"{path} {op}": dict(path=path, op=op) for path in ("transformers", "compressm")})
    finally:
        use(wrappers)
    publish(bench, args, "hf", columns=["op"], plots={"": dict(x="path", series="op", logx=False)})
    return bench
