"""The examples run as documented (small sizes)."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hf_vit_drop_in():
    full, pruned = _load("hf_vit_drop_in").main(size=64, hidden=48, layers=(1, 3), keep=0.5)
    # 16 patches -> 8 + fused -> n = 9 -> 5 + fused, plus [CLS]
    assert full.shape == (2, 17, 48) and pruned.shape == (2, 7, 48)
