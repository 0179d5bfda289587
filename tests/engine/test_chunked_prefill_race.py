"""Many prefill chunks planned while the GPU lags behind (GPU).

FlashInfer's plan() leaves the step's schedule in a pinned host buffer and
copies it to the device asynchronously; a chunked prefill plans chunk after
chunk without waiting for any result. Re-planning before the GPU reached the
previous copy gave the earlier chunk the later chunk's schedule: an illegal
memory access at 32K tokens (8 chunks) on an H100. Here the GPU is kept busy
with a sleep kernel so the host is guaranteed to run ahead; the chunked
prefill must still produce the logits of a one-shot prefill.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("prefill_backend", ["auto", "fa2"])
def test_chunks_planned_ahead_of_the_gpu(tmp_path, prefill_backend):
    pytest.importorskip("flashinfer")
    from dendrite.attention.flashinfer_backend import FlashInferBackend
    from dendrite.model.runner import ModelRunner
    from dendrite.tiny_model import build_tiny_model

    from gpu_helpers import Pager

    d = build_tiny_model(tmp_path / "m", "llama", seed=9, hidden_size=256, heads=4, kv_heads=2,
                         num_layers=2, dtype="bfloat16")
    probe = ModelRunner(d, device="cuda", dtype=torch.bfloat16, num_pages=8, page_size=16,
                        attention="reference")
    cfg = probe.config
    backend = FlashInferBackend(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, page_size=16,
                                dtype=torch.bfloat16, device="cuda",
                                prefill_backend=prefill_backend)
    runner = ModelRunner(probe.loaded, device="cuda", dtype=torch.bfloat16, num_pages=512,
                         page_size=16, attention=backend)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, cfg.vocab_size, (3000,), generator=g).tolist()
    pager = Pager(512, 16, seed=1)

    one = pager.new()
    ids, meta = pager.step([(one, prompt)], "cuda")
    ref = runner.run(ids, meta)[0].clone()

    chunked = pager.new()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time: the host plans every chunk meanwhile
    for start in range(0, len(prompt), 128):
        ids, meta = pager.step([(chunked, prompt[start:start + 128])], "cuda")
        out = runner.run(ids, meta)
    got = out[0]
    torch.cuda.synchronize()
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel < 3e-2, rel
    assert int(got.argmax()) == int(ref.argmax())
