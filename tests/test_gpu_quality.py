"""bench/quality.py's models on the GPU: no next-byte model sees the byte it predicts (the fused Phalanx
kernels included), so the quality comparison measures modelling, not a leak."""

from __future__ import annotations

import pytest
import torch

from tests.test_quality_smoke import quality

pytestmark = pytest.mark.gpu  # skipped without CUDA (conftest)


@pytest.mark.parametrize("local", ["phalanx", "swa"])
def test_models_are_causal_on_the_gpu(local: str) -> None:
    cfg, _ = quality.resolve_config(quality.parse_args(["--device", "cuda", "--swa-impl", "sdpa"]))
    cfg = {**cfg, "dim": 256, "blocks": 3, "context": 1024, "mlp_hidden": 512}
    torch.manual_seed(0)
    model = quality.HybridLM(cfg, local, 2, torch.device("cuda")).eval()
    length, t = 1000, 517  # t mid-tile, L no multiple of the block length
    seq = torch.randint(0, quality.VOCAB, (2, length), device="cuda")
    other = seq.clone()
    other[:, t] = (seq[:, t] + 1) % quality.VOCAB
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = model(seq).float(), model(other).float()
    before, after = (a[:, :t] - b[:, :t]).abs().amax().item(), (a[:, t:] - b[:, t:]).abs().amax().item()
    print(f"{local}: max logit change before t {before:.3g}, from t on {after:.3g}")
    assert after > 1e-3
    assert before <= 1e-3 * after  # exact in practice; a leak moves them as much as those after t
