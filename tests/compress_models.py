"""Tiny models and data for the compression tests (CPU, seconds)."""

from __future__ import annotations

import copy

import torch
from torch import nn

VOCAB = 24


def hf_mamba(state_size: int = 8, layers: int = 2, seed: int = 0) -> nn.Module:
    """transformers' MambaForCausalLM, tiny."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    config = MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=state_size, num_hidden_layers=layers,
                         expand=2, conv_kernel=4, time_step_rank=2, use_cache=True, pad_token_id=0,
                         bos_token_id=0, eos_token_id=0)
    return MambaForCausalLM(config)


def token_batches(n: int, batch: int = 4, seqlen: int = 16, seed: int = 1) -> list[torch.Tensor]:
    """Sequences with structure to learn: each token is the previous plus one (mod VOCAB), random start."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, VOCAB, (batch, 1), generator=g)
        out.append((start + torch.arange(seqlen)) % VOCAB)
    return out


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def masked_copy(model: nn.Module, keeps: dict[str, torch.Tensor]) -> nn.Module:
    """A full-size copy whose dropped states are silenced by zeroing their B and C rows of x_proj.

    A state with B = 0 never leaves h = 0 and with C = 0 is never read: exactly a shared state mask.
    """
    from compressm_kernels.calibration import find_mixers

    masked = copy.deepcopy(model)
    mixers = find_mixers(masked)
    with torch.no_grad():
        for name, keep in keeps.items():
            mixer = mixers[name]
            n = mixer.A_log.shape[1]
            dt_rank = mixer.x_proj.weight.shape[0] - 2 * n
            drop = torch.ones(n, dtype=torch.bool)
            drop[keep] = False
            mixer.x_proj.weight[dt_rank:dt_rank + n][drop] = 0
            mixer.x_proj.weight[dt_rank + n:][drop] = 0
    return masked


def tensors_of(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
    """Clones of every parameter, gradient, buffer and optimizer-state tensor, by a readable key."""
    out = {f"param {k}": v.detach().clone() for k, v in model.named_parameters()}
    out |= {f"grad {k}": v.grad.clone() for k, v in model.named_parameters() if v.grad is not None}
    out |= {f"buffer {k}": v.clone() for k, v in model.named_buffers()}
    if optimizer is not None:
        names = {id(p): k for k, p in model.named_parameters()}
        for p, state in optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    out[f"opt {names[id(p)]} {key}"] = value.clone()
    return out


def assert_same_tensors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys(), set(before) ^ set(after)
    for key in before:
        assert before[key].shape == after[key].shape, f"{key}: {before[key].shape} -> {after[key].shape}"
        assert torch.equal(before[key], after[key]), f"{key} changed"


class TinyLM(nn.Module):
    """Embedding → residual compressm Mamba layers → LayerNorm → head: the smallest real LM on our layer."""

    def __init__(self, d_model: int = 16, d_state: int = 8, layers: int = 2, seed: int = 0) -> None:
        from compressm_kernels.modules import Mamba

        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, d_model)
        self.layers = nn.ModuleList(Mamba(d_model, d_state=d_state, layer_idx=i) for i in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(self.norm(h))
