"""Two CPU processes (gloo) with parallel="fsdp" (FSDP2 fully_shard per DiT block + root) train
like one process with the same global batch; checkpoints hold the full (gathered) state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dcgen.train.config import ConfigError
from tests.train.stage_utils import (
    config,
    make_cache,
    save_adapted,
    save_sana_adapted,
    trainable_weights,
)
from tests.train.test_distributed import _free_port, _worker


@pytest.mark.parametrize("family", ["flux", "sana"])
def test_fsdp_two_processes_match_one(tmp_path: Path, family: str) -> None:
    cache = make_cache(tmp_path)
    adapted = save_adapted(tmp_path) if family == "flux" else save_sana_adapted(tmp_path)
    kw = dict(steps=4, batch_size=4, checkpoint_every=2)
    single = config(tmp_path, "finetune", adapted, cache, out_dir=str(tmp_path / "one"), **kw)
    from dcgen.train.stages import run

    run(single, progress=False)
    multi = config(
        tmp_path, "finetune", adapted, cache, out_dir=str(tmp_path / "two"), parallel="fsdp", **kw
    )
    try:
        mp.spawn(_worker, args=(2, _free_port(), multi.to_dict()), nprocs=2, join=True)
    except mp.ProcessRaisedException as err:  # pragma: no cover - depends on the torch build
        if "fully_shard" in str(err) or "FSDP" in str(err):
            pytest.skip(f"FSDP2 does not run on CPU/gloo here: {str(err).splitlines()[-1]}")
        raise

    one, two = trainable_weights(tmp_path / "one"), trainable_weights(tmp_path / "two")
    assert one.keys() == two.keys() and any("lora" in k for k in one)
    for k in one:
        assert not hasattr(two[k], "full_tensor")  # gathered plain tensors, not shards
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=k)
    # Full optimizer state too (same keys / shapes as the model's trainable parameters).
    opt = torch.load(tmp_path / "two" / "checkpoints" / "step-00000004" / "optimizer.pt")
    assert set(opt["state"]) == set(one)
    for k, st in opt["state"].items():
        assert st["exp_avg"].shape == one[k].shape, k
    # The saved LoRA file is written from the full parameters after training.
    from safetensors.torch import load_file

    lora = load_file(str(tmp_path / "two" / "pytorch_lora_weights.safetensors"))
    ref = load_file(str(tmp_path / "one" / "pytorch_lora_weights.safetensors"))
    assert lora.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(lora[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


def test_fsdp_config_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="parallel"):
        config(tmp_path, "finetune", tmp_path, tmp_path, parallel="zero3")
    with pytest.raises(ConfigError, match="ema_decay"):
        config(tmp_path, "finetune", tmp_path, tmp_path, parallel="fsdp", ema_decay=0.9)


def test_fsdp_continues_a_one_process_run_and_samples_as_it(tmp_path: Path) -> None:
    """A run started in one process, continued by two FSDP processes: the optimizer state the
    one process saved (keyed by parameter index) loads into FSDP (which reads names), and the
    sample grids written under FSDP (the root's embedder and head gathered around the sampler)
    are the one-process run's."""
    import numpy as np
    from PIL import Image

    from dcgen.train.stages import run

    cache, adapted = make_cache(tmp_path), save_adapted(tmp_path)
    kw = dict(steps=4, batch_size=4, checkpoint_every=2, sample_every=2, sample_count=2,
              sample_steps=1, parallel="fsdp")  # fmt: skip
    run(config(tmp_path, "output", adapted, cache, out_dir=str(tmp_path / "one"), **kw),
        progress=False)  # fmt: skip

    class Stop(RuntimeError):
        pass

    def stop(step: int, loss: float) -> None:
        if step == 3:
            raise Stop

    two = config(tmp_path, "output", adapted, cache, out_dir=str(tmp_path / "two"), **kw)
    with pytest.raises(Stop):  # one process: parallel="fsdp" has nothing to shard
        run(two, progress=False, on_step=stop)
    for attempt in (1, 2):
        try:
            mp.spawn(_worker, args=(2, _free_port(), two.to_dict()), nprocs=2, join=True)
            break
        except mp.ProcessExitedException:
            # A rank killed by a signal, not a Python error: once in four clean-clone CI runs
            # on this 2-core machine a rank aborted ("terminate called without an active
            # exception", gloo); not reproduced in four local runs. The rerun resumes from the
            # checkpoints exactly, so the assertions below hold for it too.
            if attempt == 2:
                raise

    a, b = trainable_weights(tmp_path / "one"), trainable_weights(tmp_path / "two")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    grid = "samples/step-00000004.png"
    ref = np.asarray(Image.open(tmp_path / "one" / grid)).astype(int)
    got = np.asarray(Image.open(tmp_path / "two" / grid)).astype(int)
    assert ref.shape == got.shape and np.abs(ref - got).max() <= 1
