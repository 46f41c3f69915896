"""Safe resume: checkpoints hold only tensors and plain values, load with ``weights_only=True``,
and anything else a user hands ``--resume`` (or ``--config``) is refused by name, running nothing."""
import os
import pickle
import random

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("transformers")
pytest.importorskip("yaml")

from bus.train import main, parse_config  # noqa: E402
from bus.training.checkpoint import (  # noqa: E402
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

# As tests/test_train.py: 32 px, 8 px patches, a 4-block ViT, 1-layer text and fusion stacks.
TINY = ["--size", "tiny", "--img-size", "32", "--model-arg", "vit_kwargs={patch_size: 8, depth: 4}",
        "--model-arg", "tsps_layers=[1, 2]", "--model-arg", "text_layers=1", "--model-arg", "fusion_layers=1",
        "--no-progress", "--batch-size", "4", "--train-samples", "8", "--val-samples", "4", "--viz-samples", "0",
        "--eval-every", "0"]


class _Payload:
    """Unpickling this calls ``os.system("touch MARKER")``: what a crafted last.pt would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory):
    """A genuine last.pt after 1 of 2 steps (stopped mid-run, resumable)."""
    out = tmp_path_factory.mktemp("real")
    main(TINY + ["--out", str(out), "--steps", "2", "--stop-after", "1"])
    return out / "last.pt"


def _resume_error(out, capsys, steps="2"):
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--out", str(out), "--steps", steps, "--resume", "auto"])
    assert e.value.code == 2
    return capsys.readouterr().err


def test_checkpoint_is_plain_and_loads_weights_only(real_ckpt):
    ck = torch.load(real_ckpt, map_location="cpu", weights_only=True)
    assert ck["format_version"] == FORMAT_VERSION and ck["step"] == 1 and ck["world_size"] == 1
    assert {"model", "optimizer", "scheduler", "scaler", "model_config", "train_config", "rng", "data_state"} <= set(ck)
    (s,) = ck["rng"]
    assert s["torch"].dtype == torch.uint8
    name, keys, pos, has_gauss, cached = s["numpy"]
    assert name == "MT19937" and keys.shape == (624,) and isinstance(pos, int) and isinstance(cached, float)
    version, internal, _ = s["python"]
    assert isinstance(internal, list) and len(internal) == 625
    assert load_checkpoint(str(real_ckpt))["step"] == 1


def test_rng_state_round_trips_through_weights_only(tmp_path):
    """Every stream continues exactly after save -> torch.load(weights_only=True) -> restore,
    including numpy's and python's cached Gaussians."""
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    np.random.standard_normal()  # leaves has_gauss = 1 with a cached value
    random.gauss(0.0, 1.0)  # leaves gauss_next set
    path = str(tmp_path / "rng.pt")
    save_checkpoint({"rng": rng_state()}, path)

    def draw():
        return (torch.rand(5).tolist(), np.random.standard_normal(3).tolist(), np.random.randint(0, 2**31, 3).tolist(),
                [random.random() for _ in range(3)], random.gauss(0.0, 1.0))

    first = draw()
    assert draw() != first  # the streams moved on
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert draw() == first


def test_crafted_pickle_runs_nothing_and_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"model": _Payload(marker), "step": 1}, out / "last.pt")
    err = _resume_error(out, capsys)
    assert not marker.exists(), "the checkpoint's pickle ran a command"
    assert str(out / "last.pt") in err and "refused" in err and "system" in err, err
    # The file is a working exploit: the old weights_only=False load runs it. This is what the
    # assertions above guard against.
    torch.load(out / "last.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_with_payload_is_refused(tmp_path):
    """Not a torch zip file either: a raw pickle stream with a payload."""
    marker = tmp_path / "pwned"
    path = tmp_path / "raw.pt"
    path.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(path))
    assert str(path) in str(e.value) and "refused by the safe loader" in str(e.value), str(e.value)
    assert not marker.exists()


def test_incomplete_checkpoint_names_what_is_missing(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": {}, "step": 3, "optimizer": {}}, out / "last.pt")
    err = _resume_error(out, capsys)
    assert str(out / "last.pt") in err
    for key in ("scheduler", "scaler", "model_config", "rng"):
        assert key in err.split("missing", 1)[1], err
    assert "KeyError" not in err


@pytest.mark.parametrize("mutate, message", [
    (lambda ck: ck.update(step="7"), "wrong type for step"),
    (lambda ck: ck.update(step=-1), "step -1 is negative"),
    (lambda ck: ck.update(model={"w": [1.0]}), "not a state dict of tensors"),
    (lambda ck: ck.update(rng=[{"torch": torch.zeros(3, dtype=torch.uint8)}]), "rng[0] lacks numpy, python"),
    (lambda ck: ck.update(rng=[]), "'rng' is empty"),
    (lambda ck: ck.update(format_version=FORMAT_VERSION + 1), "newer than this bus.train"),
])
def test_malformed_fields_are_named(real_ckpt, tmp_path, mutate, message):
    ck = torch.load(real_ckpt, weights_only=True)
    mutate(ck)
    path = tmp_path / "bad.pt"
    torch.save(ck, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(path))
    assert message in str(e.value) and str(path) in str(e.value)


def _copy_run(real_ckpt, tmp_path, mutate):
    out = tmp_path / "run"
    out.mkdir()
    ck = torch.load(real_ckpt, weights_only=True)
    mutate(ck)
    torch.save(ck, out / "last.pt")
    return out


def test_weights_that_do_not_fit_are_named(real_ckpt, tmp_path, capsys):
    victim = {}

    def drop_one(ck):
        victim["key"] = sorted(ck["model"])[3]
        del ck["model"][victim["key"]]
        ck["model"]["not.a.weight"] = torch.zeros(1)

    err = _resume_error(_copy_run(real_ckpt, tmp_path, drop_one), capsys)
    assert "do not fit the model" in err and victim["key"] in err and "not.a.weight" in err, err


def test_unknown_model_config_field_is_named(real_ckpt, tmp_path, capsys):
    err = _resume_error(_copy_run(real_ckpt, tmp_path, lambda ck: ck["model_config"].update(bogus_field=1)), capsys)
    assert "bogus_field" in err and "BUSConfig" in err, err


def test_genuine_checkpoint_still_resumes(real_ckpt, tmp_path):
    out = _copy_run(real_ckpt, tmp_path, lambda ck: None)
    s = main(TINY + ["--out", str(out), "--steps", "2", "--resume", "auto"])
    assert s["steps"] == 2


def _write(kind, path, real_ckpt):
    if kind == "text":
        path.write_text("hello, I am not a checkpoint\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = real_ckpt.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "list":
        torch.save([1, 2, 3], path)


@pytest.mark.parametrize("kind, message", [
    ("text", "not a readable PyTorch checkpoint"),
    ("empty", "not a readable PyTorch checkpoint"),
    ("truncated", "not a readable PyTorch checkpoint"),
    ("tensor", "holds a Tensor, not a bus.train checkpoint"),
    ("list", "holds a list, not a bus.train checkpoint"),
])
def test_non_checkpoint_files_get_clear_errors(real_ckpt, tmp_path, kind, message):
    path = tmp_path / f"{kind}.pt"
    _write(kind, path, real_ckpt)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(path))
    assert message in str(e.value) and str(path) in str(e.value), str(e.value)


def test_save_is_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    """Order: data written and fsync'd in the temporary file, renamed over the target, then the
    directory fsync'd (so the rename itself survives a power loss)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name the fsync'd files")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = str(tmp_path / "last.pt")
    save_checkpoint({"step": 1, "w": torch.arange(4)}, path)
    assert events == [("fsync", path + ".tmp"), ("replace", path + ".tmp", path), ("fsync", str(tmp_path))]
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(4))


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    path = str(tmp_path / "last.pt")
    save_checkpoint({"step": 1}, path)
    with pytest.raises(Exception):
        save_checkpoint({"step": 2, "bad": lambda: None}, path)  # a lambda does not pickle
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.pt"]  # no stale .tmp


def test_yaml_config_cannot_run_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.yaml"
    f.write_text(f"steps: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SystemExit) as e:
        parse_config(["--config", str(f)])
    assert e.value.code == 2 and "not plain YAML" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--model-arg", f"text_layers=!!python/object/apply:os.system ['touch {marker}']"])
    assert "not plain YAML" in capsys.readouterr().err
    assert not marker.exists()


def test_old_checkpoint_with_numpy_rng_is_refused_clearly(real_ckpt, tmp_path):
    """Checkpoints from before this format kept np.random.get_state() (a numpy array) in 'rng'."""
    ck = torch.load(real_ckpt, weights_only=True)
    ck["rng"][0]["numpy"] = np.random.get_state()
    path = tmp_path / "old.pt"
    torch.save(ck, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(path))
    assert "before RNG states were stored as plain values" in str(e.value) and str(path) in str(e.value)
