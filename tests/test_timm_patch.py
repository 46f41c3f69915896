"""patch_timm with the tools people train timm ViTs with (issue 15): gradient checkpointing,
deepcopy / EMA / pickling, forward_intermediates, ViTs without a class token, TorchScript refusal,
and every timm family of the README table (keep=1.0 exact, fwd+bwd with pruning).

Models are built with random weights at small sizes (timm kwargs override depth and width)."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import bus  # noqa: E402

SMALL = dict(img_size=64, depth=4, embed_dim=64, num_heads=4, num_classes=10)

# The timm families of the README table: name -> factory of a small random-weight model.
FAMILIES = {
    "vit (class token)": lambda **kw: timm.create_model("vit_base_patch16_224", pretrained=False, **SMALL, **kw),
    "deit distilled (2 prefix)": lambda **kw: timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, **SMALL, **kw),
    "vit + registers": lambda **kw: timm.create_model("vit_base_patch16_224", pretrained=False, reg_tokens=4, **SMALL, **kw),
    "vit qk_norm + LayerScale": lambda **kw: timm.create_model(
        "vit_base_patch16_224", pretrained=False, qk_norm=True, init_values=1e-2, **SMALL, **kw),
    "clip vit (norm_pre)": lambda **kw: timm.create_model("vit_base_patch16_clip_224", pretrained=False, **SMALL, **kw),
    "siglip (MAP pool, no class token)": lambda **kw: timm.create_model(
        "vit_base_patch16_siglip_224", pretrained=False, **SMALL, **kw),
    "gap (avg pool, no class token)": lambda **kw: timm.create_model(
        "vit_medium_patch16_gap_256", pretrained=False, **SMALL, **kw),
    "registers, no class token": lambda **kw: timm.create_model(
        "vit_base_patch16_224", pretrained=False, class_token=False, reg_tokens=2, global_pool="avg", **SMALL, **kw),
    "eva02 (RoPE, SwiGLU)": lambda **kw: timm.create_model(
        "eva02_tiny_patch14_224", pretrained=False, patch_size=16, **SMALL, **kw),
}


def images(B=3, size=64, seed=0):
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------ families
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_keep_one_is_exact_and_pruning_trains(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    x, t = images(2), torch.randn(2, 64)
    with torch.no_grad():
        want = model(x)
        bus.patch_timm(model, layers=(1, 2), keep=1.0)
        got, got_text = model(x), model(x, text=t)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_text, want, rtol=0, atol=0)

    torch.manual_seed(0)
    model = bus.patch_timm(FAMILIES[family]().train(), layers=(1, 2), keep=0.5)
    P = model.num_prefix_tokens
    for text in (None, t):
        model.zero_grad()
        out = model(images(2), text=text)
        feats = model.pruning_state()
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        # 16 patches -> 8 kept + fused -> 9 rankable -> 5 kept + fused
        assert feats.patch_ids.shape == (2, P + 5 + 1)
        out.square().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing


def test_auto_guidance_without_class_token_is_the_mean_patch_query():
    """No class token: the text-free guide is the mean of the block's patch queries; by hand."""
    torch.manual_seed(0)
    model = FAMILIES["registers, no class token"]().eval()
    bus.patch_timm(model, layers=(1,), keep=0.5)
    assert model.blocks[1].bus_tsps.text_free == "mean"
    seen = {}
    model.blocks[1].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        model(images(2))
        x = seen["x"]
        blk, P = model.blocks[1], model.num_prefix_tokens
        h = blk.norm1(x)
        q, k, _ = blk.attn.qkv(h).reshape(2, x.shape[1], 3, 4, 16).permute(2, 0, 3, 1, 4)
        qm = q[:, :, P:].mean(dim=2, keepdim=True)  # registers are not a guide
        want = ((qm @ k[:, :, P:].transpose(-1, -2)) * 16 ** -0.5).softmax(-1).mean(dim=1)[:, 0]
    torch.testing.assert_close(model.pruning_state().records[0]["scores"], want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # text still guides when given
        model(images(2), text=torch.randn(2, 64) * 5)
    assert not torch.allclose(model.pruning_state().records[0]["scores"], want)


def test_mean_guidance_in_packed_mode_weights_tokens_by_size():
    """mass= on a class-token model with guidance='mean': packed path runs and backpropagates."""
    model = bus.patch_timm(FAMILIES["vit (class token)"]().train(), layers=(1, 2), mass=0.6, guidance="mean")
    out = model(images(3))
    assert model.pruning_state().lengths is not None
    out.sum().backward()


# ------------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("mode", [dict(keep=0.5), dict(mass=0.6), dict(mass=0.6, max_keep=0.5)])
def test_grad_checkpointing_gives_the_same_gradients(mode):
    torch.manual_seed(0)
    ref = bus.patch_timm(FAMILIES["vit (class token)"](drop_path_rate=0.2).train(), layers=(1, 2), ptm_head=True, **mode)
    ckpt = copy.deepcopy(ref)  # same weights, PTM heads included
    ckpt.set_grad_checkpointing(True)
    x, t = images(3), torch.randn(3, 64, requires_grad=True)
    got = {}
    for name, m in (("ref", ref), ("ckpt", ckpt)):
        torch.manual_seed(1)  # same drop-path draws; checkpointing replays them
        out = m(x, text=t)
        # a PTM-like term through the records of this forward
        ptm = sum(r["scores"].square().sum() + r["ptm_logits"].mean() for r in m.pruning_state().records)
        (g_t,) = torch.autograd.grad(out.square().mean() + ptm, t, retain_graph=True)
        (out.square().mean() + ptm).backward()
        got[name] = (out.detach(), grads(m), g_t)
    assert ckpt.grad_checkpointing  # the flag the user set is untouched by the forward
    torch.testing.assert_close(got["ckpt"][0], got["ref"][0], rtol=0, atol=0)
    assert got["ckpt"][1].keys() == got["ref"][1].keys()
    for n in got["ref"][1]:
        torch.testing.assert_close(got["ckpt"][1][n], got["ref"][1][n], rtol=1e-5, atol=1e-6, msg=n)
    torch.testing.assert_close(got["ckpt"][2], got["ref"][2], rtol=1e-5, atol=1e-6)


def _load_example(name: str):
    """The module ``examples/<name>.py`` (examples are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"examples_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# Bytes of the distinct storages autograd saves for backward while fn() runs; the example's
# counter, so the README's figure and this test measure the same thing. Tensors saved inside a
# non-reentrant checkpoint are not saved (its hooks store none), only its inputs.
saved_activation_bytes = _load_example("checkpoint_memory").saved_activation_bytes


def test_grad_checkpointing_saves_activation_memory():
    torch.manual_seed(0)
    model = bus.patch_timm(FAMILIES["vit (class token)"]().train(), layers=(1, 2), keep=0.5)
    x = images(4)
    _, dense = saved_activation_bytes(lambda: model(x))
    model.set_grad_checkpointing(True)
    _, ckpt = saved_activation_bytes(lambda: model(x))
    assert ckpt < 0.5 * dense, (ckpt, dense)


# --------------------------------------------------------------- deepcopy, EMA, pickling
def test_deepcopy_ema_and_pickle_after_a_training_forward():
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = bus.patch_timm(FAMILIES["vit (class token)"]().train(), layers=(1, 2), keep=0.5)
    x, t = images(2), torch.randn(2, 64)
    out = model(x, text=t)  # graph alive: the state of this forward carries it
    assert model.pruning_state().records[0]["scores"].grad_fn is not None
    twin = copy.deepcopy(model)
    ema = ModelEmaV3(model, decay=0.9)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # our own bytes: a whole pickled module
    out.sum().backward()  # the original's graph is intact
    model.eval()
    with torch.no_grad():
        want = model(x, text=t)
        for other in (twin, ema.module, loaded):
            assert type(other) is type(model) and other.pruning_state() is None
            assert other._bus_holder is other.blocks[1]._bus_holder is not model._bus_holder
            torch.testing.assert_close(other.eval()(x, text=t), want, rtol=0, atol=0)
            assert other.pruning_state().patch_ids.shape == model.pruning_state().patch_ids.shape
    ema.update(model)


def test_backward_releases_the_records_graph():
    """The model does not pin the last forward's graph once its backward has run: records are
    detached then; before it, a loss built from them (PTM) gets its gradient."""
    model = bus.patch_timm(FAMILIES["vit (class token)"]().train(), layers=(1, 2), keep=0.5)
    out = model(images(2), text=torch.randn(2, 64))
    scores = model.pruning_state().records[0]["scores"]
    assert scores.grad_fn is not None
    (out.sum() + scores.sum()).backward()
    assert all(v.grad_fn is None for r in model.pruning_state().records for v in r.values())
    assert model.pruning_state().patch_ids is not None  # the rest of the state stays
    model.clear_pruning_state()
    assert model.pruning_state() is None


# ------------------------------------------------------------------ forward_intermediates
def test_forward_intermediates_prunes_and_returns_patch_ids():
    torch.manual_seed(0)
    model = FAMILIES["vit (class token)"]().eval()
    x, t = images(2), torch.randn(2, 64)
    with torch.no_grad():
        dense_final, dense = model.forward_intermediates(x, output_fmt="NLC")
        bus.patch_timm(model, layers=(1, 2), keep=0.5)
        # keep the early ones dense and identical; NCHW works before the first pruning layer
        early = model.forward_intermediates(x, indices=[0], intermediates_only=True)
        final, inter = model.forward_intermediates(x, output_fmt="NLC", text=t)
        pooled = model(x, text=t)
    assert early[0].shape == (2, 64, 4, 4)
    torch.testing.assert_close(early[0], dense[0].transpose(1, 2).reshape(2, 64, 4, 4))
    assert [tuple(y.shape) for y in dense] == [(2, 16, 64)] * 4
    # block 1 keeps 8 + fused, block 2 keeps 5 + fused (patch tokens: the prefix is split off)
    assert [tuple(y.shape) for y in inter] == [(2, 16, 64), (2, 9, 64), (2, 6, 64), (2, 6, 64)]
    ids = model.pruning_state().block_patch_ids
    assert sorted(ids) == [1, 2, 3] and ids[1].shape == (2, 1 + 9) and torch.equal(ids[3], ids[2])
    torch.testing.assert_close(model.forward_head(final), pooled)
    with pytest.raises(ValueError, match="output_fmt='NLC'"):
        model.forward_intermediates(x)
    massed = bus.patch_timm(FAMILIES["vit (class token)"]().eval(), layers=(1,), mass=0.5)
    with pytest.raises(NotImplementedError, match="mass="):
        massed.forward_intermediates(x, output_fmt="NLC")


def test_forward_intermediates_keep_one_is_exact():
    model = FAMILIES["siglip (MAP pool, no class token)"]().eval()
    x = images(2)
    with torch.no_grad():
        want = model.forward_intermediates(x)
        bus.patch_timm(model, layers=(1,), keep=1.0)
        got = model.forward_intermediates(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------- refusals
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_is_refused_with_a_pointer_to_compile_and_export():
    model = bus.patch_timm(FAMILIES["vit (class token)"]().eval(), layers=(1,), keep=0.5)
    with pytest.raises(RuntimeError, match="torch.compile"):
        torch.jit.script(model)


def test_eva02_kept_tokens_keep_their_rope_positions():
    """The block after a pruning layer equals the host EvaBlock run on the kept tokens with the
    RoPE rows of their own patches (identity rotation for the fused token), built by hand."""
    torch.manual_seed(0)
    model = bus.patch_timm(FAMILIES["eva02 (RoPE, SwiGLU)"]().eval(), layers=(1,), keep=0.5)
    seen = {}
    model.blocks[2].register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    model.blocks[2].register_forward_hook(lambda m, a, out: seen.update(out=out))
    with torch.no_grad():
        model.forward_features(images(2), text=torch.randn(2, 64))
        ids = model.pruning_state().block_patch_ids[1][:, 1:]  # after the class token
        rope = model.rope.get_embed()  # [16, 2 * head_dim]: sin, cos
        rows = []
        for b in range(2):
            kept = [rope[i] for i in ids[b].tolist() if i >= 0]
            fused = torch.cat([torch.zeros(16), torch.ones(16)])
            rows.append(torch.stack(kept + [fused]))
        host = type(model.blocks[2]).__mro__[1]
        want = host.forward(model.blocks[2], seen["x"], rope=torch.stack(rows)[:, None])
    assert (ids[:, :-1] >= 0).all() and (ids[:, -1] == -1).all()
    torch.testing.assert_close(seen["out"], want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="RoPE"):
        bus.patch_timm(FAMILIES["eva02 (RoPE, SwiGLU)"](), layers=(1,), mass=0.5)


@pytest.mark.parametrize("family", ["eva02 (RoPE, SwiGLU)", "siglip (MAP pool, no class token)"])
def test_grad_checkpointing_other_families(family):
    torch.manual_seed(0)
    ref = bus.patch_timm(FAMILIES[family]().train(), layers=(1, 2), keep=0.5)
    ckpt = copy.deepcopy(ref)
    ckpt.set_grad_checkpointing(True)
    x, t = images(2), torch.randn(2, 64)
    for m in (ref, ckpt):
        m(x, text=t).square().mean().backward()
    for (n, a), b in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------------- FSDP2
def test_fsdp2_two_gloo_ranks():
    """fully_shard of a patched model: two gloo ranks on CPU, gradients equal an unsharded run."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(repo, "tests", "fsdp2_worker.py")]
    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "FSDP2 OK" in p.stdout


# ------------------------------------------------------------- export, compile, FX refusal
def test_torch_export_of_a_fixed_keep_model():
    torch.manual_seed(0)
    model = bus.patch_timm(FAMILIES["registers, no class token"]().eval(), layers=(1, 2), keep=0.5)
    x, t = images(2), torch.randn(2, 64)
    ep = torch.export.export(model, (x,), {"text": t})
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x, text=t), model(x, text=t), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ep.module()(images(2, seed=1), text=t), model(images(2, seed=1), text=t),
                                   rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_fixed_keep_and_mass_with_breaks():
    """Fixed keep: one graph, forward and backward. mass= without a bound: correct under
    torch.compile, with a graph break at select_tokens_varlen's count read (with max_keep= there
    is none: tests/test_timm_trace.py)."""
    torch.manual_seed(0)
    model = bus.patch_timm(FAMILIES["vit (class token)"]().train(), layers=(1, 2), keep=0.5)
    x, t = images(2), torch.randn(2, 64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(x, text=t)
    torch.testing.assert_close(got, model(x, text=t), rtol=1e-5, atol=1e-6)
    got.sum().backward()
    massed = bus.patch_timm(FAMILIES["vit (class token)"]().eval(), layers=(1,), mass=0.5)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(massed, backend="eager")(x), massed(x), rtol=1e-5, atol=1e-6)
