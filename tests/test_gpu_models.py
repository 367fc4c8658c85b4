"""Whole layers and models on a GPU against the same weights on the CPU kernels: our Mamba layer (fused and
unfused paths, masks, decoding) and, where mamba_ssm is importable, its stock ``MambaLMHeadModel`` through
``install()`` (training step and ``generate()``).

The CPU kernels are checked against the reference elsewhere, so CPU == GPU here checks the CUDA route of the
whole layer: in_proj's layout, the conv, the CUDA scan, out_proj and the decode step. Skipped without a
CUDA device; collecting this module does not touch the device.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from compressm_kernels.modules import Mamba
from scan_cases import assert_close
from test_mamba_layer import decode

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
F32 = torch.float32


@pytest.fixture(autouse=True)
def exact_float32():
    """cuDNN's convolutions default to TF32 (~1e-3 relative error); compare plain float32 arithmetic."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def make_layer(mask_kind: str, d_state: int = 13) -> Mamba:
    torch.manual_seed(0)
    layer = Mamba(48, d_state=d_state, layer_idx=0)
    with torch.no_grad():  # distinguishable states (S4D-real A is the same in every channel)
        layer.A_log.add_(0.3 * torch.randn(layer.A_log.shape))
    gen = torch.Generator().manual_seed(3)
    if mask_kind == "shared":
        layer.set_state_mask(torch.rand(d_state, generator=gen) > 0.5)
    elif mask_kind == "per-channel":
        layer.set_state_mask(torch.rand(layer.d_inner, d_state, generator=gen) > 0.5)
    return layer


def out_and_grads(layer: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    for p in layer.parameters():
        p.grad = None
    y = layer(x)
    weights = torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)
    (y * weights).sum().backward()
    return {"out": y.detach().cpu(), **{n: p.grad.cpu() for n, p in layer.named_parameters()}}


@pytest.mark.parametrize("fast_path", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("mask_kind", ["none", "shared", "per-channel"])
def test_layer_on_gpu_equals_layer_on_cpu(mask_kind: str, fast_path: bool) -> None:
    cpu_layer = make_layer(mask_kind)
    gpu_layer = copy.deepcopy(cpu_layer).cuda()
    cpu_layer.use_fast_path = gpu_layer.use_fast_path = fast_path
    x = torch.randn(2, 300, 48, generator=torch.Generator().manual_seed(1))  # L spans two 256-step chunks
    expected = out_and_grads(cpu_layer, x)
    found = out_and_grads(gpu_layer, x.cuda())
    for name in expected:
        assert_close(found[name], expected[name], F32, name)


@pytest.mark.parametrize("mask_kind", ["none", "per-channel"])
def test_decode_on_gpu_equals_full_forward(mask_kind: str) -> None:
    layer = make_layer(mask_kind).cuda()
    x = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        full = layer(x)
        for prompt in (1, 5):  # shorter and longer than d_conv
            assert_close(decode(layer, x, prompt), full, F32, f"decode after a {prompt}-token prompt")


def test_compacted_layer_on_gpu_equals_masked_layer() -> None:
    masked = make_layer("shared").cuda()
    keep = masked.state_mask.nonzero().flatten()
    compact = copy.deepcopy(masked)
    compact.reduce_state(keep)
    x = torch.randn(2, 300, 48, generator=torch.Generator().manual_seed(4)).cuda()
    want, got = out_and_grads(masked, x), out_and_grads(compact, x)
    keep, n = keep.cpu(), masked.d_state
    want["A_log"] = want["A_log"][:, keep]
    want["x_proj.weight"] = want["x_proj.weight"][torch.cat([torch.arange(masked.dt_rank), masked.dt_rank + keep,
                                                             masked.dt_rank + n + keep])]
    for name in want:
        assert_close(got[name], want[name], F32, name)


def test_stock_mamba_ssm_model_on_gpu_equals_cpu() -> None:
    """mamba_ssm's MambaLMHeadModel on CUDA tensors, its scan through our selective_scan_cuda (install()),
    against the same model on the CPU route: logits, every gradient, then generate() == full forward."""
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba_ssm is not installed")
    from compressm_kernels.integrations import mamba_ssm as bridge

    done = bridge.install()
    assert done["selective_scan_cuda"].startswith("compressm"), done
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=50, ssm_cfg={"d_state": 12}, rms_norm=True,
                      fused_add_norm=True, residual_in_fp32=True)
    torch.manual_seed(0)
    on_cpu = MambaLMHeadModel(cfg)
    on_gpu = copy.deepcopy(on_cpu).cuda()
    ids = torch.randint(0, 50, (2, 270), generator=torch.Generator().manual_seed(1))
    results = []
    for model, tokens in ((on_cpu, ids), (on_gpu, ids.cuda())):
        logits = model(tokens).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
        results.append({"logits": logits.detach().cpu(), **{n: p.grad.cpu() for n, p in model.named_parameters()}})
    for name in results[0]:
        assert_close(results[1][name], results[0][name], F32, name)

    prompt = ids[:, :7].cuda()
    out = on_gpu.generate(prompt, max_length=15, output_scores=True, return_dict_in_generate=True)
    assert tuple(out.sequences.shape) == (2, 15)
    with torch.no_grad():
        full = on_gpu(out.sequences.clone()).logits
    assert_close(torch.stack(out.scores, 1), full[:, 6:14], F32, "generate scores")
