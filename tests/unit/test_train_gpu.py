"""DeepSpeed bf16 training of the adapter on a CUDA GPU (skipped without one).

The CPU suite covers the training loop end to end under Ray Train (fp32 engine, bf16 autocast); these
check what only a GPU runs: the engine in bf16 (`ds_config`'s GPU branch), over NCCL.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

ENCS = [{"name": "enc_a", "width": 16, "layers": [1, 2], "frame_rate": 50.0}]


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from ralm.llm.models import make_tiny_llm

    return make_tiny_llm(str(tmp_path_factory.mktemp("llm") / "tiny"))


@pytest.fixture(scope="module")
def nccl_group():
    from ralm.train.loop import single_process_group

    with single_process_group("nccl"):
        yield


def _batch(alm):
    from ralm.train.data import Example, collate

    rng = np.random.default_rng(0)
    exs = []
    for i, (q, a, frames) in enumerate([("What do you hear?", "A bell rings twice.", 30),
                                        ("Who speaks?", "A woman, calmly.", 45)]):
        s, t = alm.encode_text(q, a)
        f = {"enc_a": rng.normal(size=(2, frames, 16)).astype(np.float16)}
        exs.append(Example(f"x{i}", f"c{i}", f, s, t, 0))
    return collate(exs)


def _engine(llm_dir: str, zero_stage: int, seed: int):
    import deepspeed

    from ralm.config import RalmConfig
    from ralm.model.alm import ALM
    from ralm.train.loop import ds_config

    tc = RalmConfig().train.model_copy(update={"precision": "bf16", "batch_size": 2, "zero_stage": zero_stage})
    alm = ALM.build(llm_dir, ENCS, adapter_hidden=32, fusion="sum", dtype=torch.bfloat16, device="cuda",
                    seed=seed)
    opt = torch.optim.AdamW(alm.trainable_parameters(), lr=3e-3)
    engine, _, _, _ = deepspeed.initialize(model=alm.frontend, optimizer=opt, config=ds_config(tc, True),
                                           dist_init_required=False)
    return alm, engine


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_deepspeed_bf16_trains_only_the_adapter_and_checkpoints(llm_dir: str, nccl_group, tmp_path: Path,
                                                                 zero_stage: int):
    alm, engine = _engine(llm_dir, zero_stage, seed=0)
    assert engine.bfloat16_enabled()
    llm_before = {k: v.clone() for k, v in alm.llm.state_dict().items()}
    batch = _batch(alm)
    losses = []
    for _ in range(12):
        loss, _ = alm.loss(batch, frontend=engine)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1, losses  # it learns
    assert all(p.dtype == torch.bfloat16 and p.is_cuda for p in alm.frontend.parameters())
    assert all(torch.equal(v, llm_before[k]) for k, v in alm.llm.state_dict().items())  # the LLM stays frozen

    engine.save_checkpoint(str(tmp_path), tag="t", exclude_frozen_parameters=True)
    state = {k: v.clone() for k, v in alm.frontend.state_dict().items()}  # adapter + the norm's running stats
    alm.frontend.eval()  # eval: the norm uses its running statistics and leaves them alone
    with torch.no_grad():
        want = alm.loss(batch, frontend=engine)[0].item()
    alm2, engine2 = _engine(llm_dir, zero_stage, seed=1)  # another initial adapter, then the checkpoint
    assert not all(torch.equal(v, state[k]) for k, v in alm2.frontend.state_dict().items())
    engine2.load_checkpoint(str(tmp_path), tag="t")
    assert all(torch.equal(v, state[k]) for k, v in alm2.frontend.state_dict().items())
    alm2.frontend.eval()
    with torch.no_grad():
        assert alm2.loss(batch, frontend=engine2)[0].item() == want
