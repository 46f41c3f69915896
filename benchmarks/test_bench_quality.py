"""Quality beside speed: BUS and the baseline trained for the same number of steps on the
synthetic captioned shapes (tiny config, CPU-sized), text-free retrieval recall@1 recorded next to
the wall time of the whole run, so "equal quality" is measured rather than assumed."""
from __future__ import annotations

import pytest

pytest.importorskip("timm")
pytest.importorskip("transformers")

from conftest import DEVICE, run  # noqa: E402

STEPS = 600
ARGS = [
    "--size", "tiny", "--img-size", "32", "--model-arg", "vit_kwargs={patch_size: 8, depth: 4}",
    "--model-arg", "tsps_layers=[1, 2]", "--model-arg", "text_layers=1", "--model-arg", "fusion_layers=1",
    "--no-progress", "--steps", str(STEPS), "--batch-size", "16", "--lr", "2e-3", "--warmup-steps", "10",
    "--train-samples", "1024", "--val-samples", "64", "--max-objects", "1", "--eval-every", str(STEPS),
    "--ckpt-every", "0", "--precision", "fp32", "--seed", "0", "--device", DEVICE.type,
]


@pytest.mark.parametrize("model", ["baseline", "bus"])
def test_recall_after_equal_steps(benchmark, tmp_path, model):
    import torch

    from bus.train import main

    result = {}

    def train():
        result.update(main(ARGS + ["--model", model, "--out", str(tmp_path / model)]))

    benchmark.extra_info.update({"i2t_r@1": None})
    run(benchmark, train, op="quality", impl=model, shape=f"tiny 32px {STEPS} steps", dtype=torch.float32,
        mode="train+eval", images=16 * STEPS, reference=model == "baseline", rounds=1, warmup=False)
    benchmark.extra_info.update({"i2t_r@1": result.get("i2t_r@1"), "t2i_r@1": result.get("t2i_r@1")})
