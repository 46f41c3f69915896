"""patch_timm under graph capture (issue 15): ``mass=`` with a bound (``max_keep``) as a fixed-shape
padded layout (torch.compile fullgraph, no host sync), and torch.fx tracing / timm and
torchvision FX feature extraction with the pruned blocks as leaves.

Models are small random-weight timm ViTs (64 px, patch 16: 16 patches, 4 blocks, width 64)."""
import copy

import pytest
import torch

timm = pytest.importorskip("timm")

import bus  # noqa: E402

# The sync counter and its set-up (value checks off, Triton first) of tests/test_syncs.py.
from test_syncs import _train_step_syncs, no_value_checks, triton_first  # noqa: E402,F401

SMALL = dict(img_size=64, depth=4, embed_dim=64, num_heads=4, num_classes=10)


def vit(**kw):
    return timm.create_model("vit_base_patch16_224", pretrained=False, **SMALL, **kw)


def images(B=3, size=64, seed=0):
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


def text_inputs(B=3, T=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 2:] = False
    mask[-1, 1] = False
    return torch.randn(B, T, 64, generator=g) * 3, mask


def twins(seed=0, **patch):
    """The same random ViT patched twice: with ``patch`` (mass=, no bound) and with ``patch`` +
    the bound passed as ``bounded=``."""
    bound = patch.pop("bounded")
    torch.manual_seed(seed)
    base = vit()
    packed = bus.patch_timm(copy.deepcopy(base), **patch)
    padded = bus.patch_timm(base, max_keep=bound, **patch)
    return packed, padded


def per_sample(state):
    """Per-sample patch ids of the output tokens (a list of lists), packed or padded layout."""
    ids = state.patch_ids
    if ids.dim() == 1:  # packed [total] + cu_seqlens
        cu = state.cu_seqlens.tolist()
        return [ids[cu[b]:cu[b + 1]].tolist() for b in range(len(cu) - 1)]
    return [ids[b, : int(state.lengths[b])].tolist() for b in range(ids.shape[0])]


def real_rows(tokens, lengths):
    return [tokens[b, : int(lengths[b])] for b in range(tokens.shape[0])]


# ------------------------------------------------------------- mass= with a bound: padded
@pytest.mark.parametrize("fuse,guidance,with_text", [("sum", "auto", True), ("sum", "auto", False),
                                                     ("mean", "cls", False), (None, "mean", True)])
def test_bound_that_does_not_bind_equals_the_packed_mass_path(fuse, guidance, with_text):
    """max_keep=1.0 never binds: the same kept tokens, outputs, records and gradients as mass= alone."""
    packed, padded = twins(layers=(1, 2), mass=0.6, min_keep=2, fuse=fuse, guidance=guidance, bounded=1.0)
    x = images(3)
    text, mask = text_inputs(3) if with_text else (None, None)
    got = {}
    for name, m in (("packed", packed), ("padded", padded)):
        m.train()
        feats = m.forward_features(x, text=text, text_mask=mask)
        st = m.pruning_state()
        loss = feats[:, 0].square().mean() + m.forward_head(feats).square().mean()
        loss.backward()
        got[name] = (feats.detach(), st, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    (fp, sp, gp), (fb, sb, gb) = got["packed"], got["padded"]
    assert sb.padded and not sp.padded
    assert per_sample(sb) == per_sample(sp)
    assert torch.equal(sb.lengths, sp.lengths)
    # layer 1 keeps from 16 patches, layer 2 from <= 16 + fused slots: bound 1.0 -> [B, 1 + 17 + 1, D]
    F_ = int(fuse is not None)
    assert fb.shape == (3, 1 + (16 + F_) + F_, 64)
    for a, b in zip(real_rows(fb, sb.lengths), real_rows(fp, sp.lengths)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for b in range(3):  # padding rows are zeros in both layouts
        assert not fb[b, int(sb.lengths[b]):].any() and not fp[b, int(sp.lengths[b]):].any()
    for rb, rp in zip(sb.records, sp.records):
        n = min(rb["scores"].shape[1], rp["scores"].shape[1])
        torch.testing.assert_close(rb["scores"][:, :n], rp["scores"][:, :n], rtol=1e-5, atol=1e-6)
        assert not rb["scores"][:, n:].any() and not rp["scores"][:, n:].any()
        assert torch.equal(rb["patch_ids"][:, :n], rp["patch_ids"][:, :n])
    assert gb.keys() == gp.keys()
    for n in gp:
        torch.testing.assert_close(gb[n], gp[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("bound,M", [(3, 3), (0.25, 4)])
def test_bound_that_binds_clamps_each_sample_to_its_top_tokens(bound, M):
    """A binding bound keeps each sample's min(count, bound) best tokens (the contract's ranking),
    fuses every other patch, and the layout is [B, P + M + 1, D]."""
    packed, padded = twins(layers=(1,), mass=0.95, bounded=bound)
    x, (text, mask) = images(4), text_inputs(4)
    with torch.no_grad():
        packed.eval()(x, text=text, text_mask=mask)
        feats = padded.eval().forward_features(x, text=text, text_mask=mask)
    sp, sb = packed.pruning_state(), padded.pruning_state()
    want_counts = sp.lengths - 2  # prefix + fused
    assert (want_counts > M).any(), "the bound must bind for some sample in this test"
    assert torch.equal(sb.lengths - 2, want_counts.clamp(max=M))
    assert feats.shape == (4, 1 + M + 1, 64)
    scores = sb.records[0]["scores"]
    for b, ids in enumerate(per_sample(sb)):
        k = int(sb.lengths[b]) - 2
        top = torch.sort(scores[b], descending=True, stable=True).indices[:k]
        assert ids[1:-1] == sorted(top.tolist()) and ids[0] == ids[-1] == -1
        # the fused token stands for every other patch; padding rows stand for none
        assert float(sb.sizes[b, 1 + k]) == 16 - k and float(sb.sizes[b, 1 + k + 1:].sum()) == 0


@pytest.mark.parametrize("fuse", ["sum", "mean", None])
def test_padded_selection_equals_select_tokens_per_sample(fuse):
    """Each sample of the bounded layout is what bus_kernels.select_tokens gives for that sample
    alone with its own count (on its real rows only), then zero rows of size 0."""
    import bus_kernels as bk
    from bus.tsps import PruneState

    g = torch.Generator().manual_seed(3)
    B, P, n, D, M = 4, 2, 11, 24, 6
    x = torch.randn(B, P + n, D, generator=g, requires_grad=True)
    n_real = torch.tensor([11, 7, 9, 3])
    real = torch.arange(n)[None] < n_real[:, None]
    scores = torch.randn(B, n, generator=g).masked_fill(~real, float("-inf")).softmax(-1)
    scores[1, 2] = scores[1, 4]  # a tie: the lower index wins
    keep = torch.tensor([8, 2, 0, 3])  # sample 0 over the bound, sample 3 all its real tokens
    sizes = torch.cat([torch.ones(B, P), torch.randint(1, 4, (B, n), generator=g).float() * real], 1)
    ids = torch.cat([torch.full((B, P), -1), torch.arange(n).expand(B, n).where(real, -1)], 1)
    tsps = bus.TSPS(D, mass=0.5, max_keep=M, fuse=fuse)
    state = PruneState(batch=B, num_prefix=P)
    out = tsps._select_padded(x, scores, ids, sizes, keep, n_real, M, state)
    F_ = int(fuse is not None)
    assert out.shape == (B, P + M + F_, D)
    assert state.lengths.tolist() == [P + k + F_ for k in (6, 2, 0, 3)]
    for b, k in enumerate((6, 2, 0, 3)):
        L, r = P + k + F_, int(n_real[b])
        if k == 0:  # select_tokens needs k >= 1: the fused token of everything by hand
            w = scores[b, :r]
            fused = w @ x[b, P:P + r] if fuse == "sum" else (w @ x[b, P:P + r]) / w.sum()
            want = torch.cat([x[b, :P]] + ([fused[None]] if fuse else []))
            want_ids = []
        else:
            sel = bk.select_tokens(x[b:b + 1, :P + r], scores[b:b + 1, :r], k, num_prefix=P, fuse=fuse, backend="torch")
            want, want_ids = sel.tokens[0], (sel.indices[0] - P).tolist()
        torch.testing.assert_close(out[b, :L], want, rtol=1e-5, atol=1e-6)
        assert not out[b, L:].any()
        assert state.patch_ids[b, P:P + k].tolist() == want_ids and (state.patch_ids[b, P + k:] == -1).all()
        assert torch.equal(state.sizes[b, P:P + k], sizes[b, P:][want_ids])
        if fuse:
            assert float(state.sizes[b, P + k]) == float(sizes[b, P:].sum() - sizes[b, P:][want_ids].sum())
        assert not state.sizes[b, L:].any()
    out.square().sum().backward()  # differentiable w.r.t. x (kept and fused rows)
    assert x.grad is not None and x.grad[0, P:].abs().sum(-1).gt(0).all() == (fuse is not None)


def test_bad_bound_raises_naming_it():
    for bad in (0, -2, 1.5, 0.0, True, "3", [2]):
        with pytest.raises(ValueError, match="max_keep"):
            bus.patch_timm(vit(), layers=(1,), mass=0.5, max_keep=bad)
    with pytest.raises(ValueError, match="max_keep.*mass="):
        bus.patch_timm(vit(), layers=(1,), keep=0.5, max_keep=4)
    with pytest.raises(ValueError, match="max_keep"):
        bus.TSPS(64, mass=None, max_keep=0.5)


def test_compile_fullgraph_bounded_mass_forward_backward_matches_eager():
    torch.manual_seed(0)
    model = bus.patch_timm(vit().train(), layers=(1, 2), mass=0.6, min_keep=2, max_keep=0.5, ptm_head=True)
    twin = copy.deepcopy(model)
    x, (text, mask) = images(3), text_inputs(3)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    got = compiled(x, text=text, text_mask=mask)
    want = model(x, text=text, text_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(twin.pruning_state().lengths, model.pruning_state().lengths)
    assert per_sample(twin.pruning_state()) == per_sample(model.pruning_state())
    for out, m in ((got, twin), (want, model)):  # with a PTM-like term through the records
        ptm = sum(r["ptm_logits"].square().mean() + r["scores"].square().sum() for r in m.pruning_state().records)
        (out.square().mean() + ptm).backward()
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert a.grad is not None and b.grad is not None, n
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=n)
    # another batch (other per-sample counts, same shapes): the same graph, no recompile
    x2 = images(3, seed=5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got2 = compiled(x2, text=text, text_mask=mask)
    torch.testing.assert_close(got2, model(x2, text=text, text_mask=mask), rtol=1e-5, atol=1e-5)
    assert torch.equal(twin.pruning_state().lengths, model.pruning_state().lengths)


@pytest.mark.usefixtures("no_value_checks", "triton_first")
def test_bounded_mass_train_step_makes_no_sync():
    c, _ = _train_step_syncs(mass=0.6, min_keep=2, max_keep=0.5)
    assert c.library == 0, c.report()


# ------------------------------------------------------------------------------- torch.fx
FX_CASES = {
    "keep 0.5": dict(layers=(1, 2), keep=0.5),
    "keep 1.0": dict(layers=(1, 2), keep=1.0),
    "mass": dict(layers=(1, 2), mass=0.6),
    "mass + bound": dict(layers=(1, 2), mass=0.6, max_keep=0.5),
}


@pytest.mark.parametrize("case", list(FX_CASES))
def test_fx_symbolic_trace_matches_eager(case):
    torch.manual_seed(0)
    model = bus.patch_timm(vit().eval(), **FX_CASES[case])
    gm = torch.fx.symbolic_trace(model)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("blocks.")]
    # block 0 (before the first pruning layer) is traced through as timm's; blocks 1-3 are leaves
    assert [t for t in calls if t.count(".") == 1] == ["blocks.1", "blocks.2", "blocks.3"]
    assert {t.split(".")[1] for t in calls if t.count(".") > 1} == {"0"}
    x, (text, mask) = images(3), text_inputs(3)
    with torch.no_grad():
        for kw in (dict(), dict(text=text[:, 0]), dict(text=text, text_mask=mask)):
            want = model(x, **kw)
            ids_eager = kept_ids(model.pruning_state())
            model.clear_pruning_state()
            got = gm(x, **kw)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            # the graph's run is the model's last forward, with the same kept patches
            assert kept_ids(model.pruning_state()) == ids_eager
            assert len(model.pruning_state().records) == 2
    with pytest.raises(ValueError, match="text must be"):
        gm(x, text=torch.randn(3, 7))


def kept_ids(state):
    """Per-sample patch ids of the output tokens in any layout (None: nothing pruned)."""
    if state.patch_ids is None:
        return None
    if state.patch_ids.dim() == 1 or state.lengths is not None:
        return per_sample(state)
    return state.patch_ids.tolist()


def test_timm_and_torchvision_fx_feature_extraction():
    from timm.models import create_feature_extractor, get_graph_node_names
    from timm.models._features_fx import FeatureGraphNet

    torch.manual_seed(0)
    model = bus.patch_timm(vit().eval(), layers=(1, 2), keep=0.5)
    x, (text, mask) = images(3), text_inputs(3)
    seen = {}
    hooks = [model.blocks[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)) for i in range(4)]
    with torch.no_grad():
        model(x, text=text, text_mask=mask)
    for h in hooks:
        h.remove()
    _, eval_nodes = get_graph_node_names(model)
    assert {"blocks.1", "blocks.2", "blocks.3"} <= set(eval_nodes)
    ext = create_feature_extractor(model, return_nodes={"blocks.1": "b1", "blocks.3": "b3"})
    with torch.no_grad():
        out = ext(x, text=text, text_mask=mask)
    assert out["b1"].shape == (3, 1 + 8 + 1, 64) and out["b3"].shape == (3, 1 + 5 + 1, 64)
    torch.testing.assert_close(out["b1"], seen[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["b3"], seen[3], rtol=1e-5, atol=1e-6)
    # a graph cut after block 1 (block 2 and 3 dropped): the run's state is still there
    cut = create_feature_extractor(model, return_nodes=["blocks.1"])
    with torch.no_grad():
        (b1,) = cut(x, text=text, text_mask=mask).values()
    torch.testing.assert_close(b1, seen[1], rtol=1e-5, atol=1e-6)
    assert sorted(model.pruning_state().block_patch_ids) == [1]
    with torch.no_grad():  # and the eager model is not disturbed by the open graph run
        torch.testing.assert_close(model(x, text=text, text_mask=mask), model(x, text=text, text_mask=mask))
        assert sorted(model.pruning_state().block_patch_ids) == [1, 2, 3]
    # timm's feature_cls="fx" wrapper (FeatureGraphNet), text-free
    net = FeatureGraphNet(model, out_indices=(0, 2))
    hooks = [model.blocks[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)) for i in (0, 2)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        f0, f2 = net(x)
    assert f0.shape == (3, 17, 64) and f2.shape == (3, 1 + 5 + 1, 64)
    torch.testing.assert_close(f0, seen[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f2, seen[2], rtol=1e-5, atol=1e-6)


def test_fx_trace_trains():
    """A traced graph of a pruned model backpropagates like the model."""
    torch.manual_seed(0)
    model = bus.patch_timm(vit().train(), layers=(1, 2), keep=0.5, ptm_head=True)
    gm = torch.fx.symbolic_trace(model)
    x, (text, mask) = images(2), text_inputs(2)
    gm(x, text=text[:2], text_mask=mask[:2]).square().mean().backward()
    g_graph = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(x, text=text[:2], text_mask=mask[:2]).square().mean().backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g_graph[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("family", ["deit distilled (2 prefix)", "vit + registers", "siglip (MAP pool, no class token)",
                                    "gap (avg pool, no class token)", "eva02 (RoPE, SwiGLU)"])
def test_fx_symbolic_trace_other_families(family):
    from test_timm_patch import FAMILIES

    torch.manual_seed(0)
    model = bus.patch_timm(FAMILIES[family]().eval(), layers=(1, 2), keep=0.5)
    gm = torch.fx.symbolic_trace(model)
    x, t = images(2), torch.randn(2, 64) * 3
    with torch.no_grad():
        for kw in (dict(), dict(text=t)):
            want = model(x, **kw)
            ids = model.pruning_state().patch_ids.tolist()
            model.clear_pruning_state()
            torch.testing.assert_close(gm(x, **kw), want, rtol=1e-5, atol=1e-6)
            assert model.pruning_state().patch_ids.tolist() == ids


def test_bounded_mass_under_bf16_autocast():
    """bf16 autocast: the bounded layout runs forward and backward, finite."""
    torch.manual_seed(0)
    model = bus.patch_timm(vit().train(), layers=(1, 2), mass=0.6, max_keep=0.5)
    x, (text, mask) = images(3), text_inputs(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.forward_features(x, text=text, text_mask=mask)
        out = model.forward_head(feats)
    st = model.pruning_state()
    assert feats.shape == (3, 1 + 5 + 1, 64)  # bounds: 8 of 16 patches, then ceil(0.5 * (8 + fused)) = 5
    assert torch.isfinite(out).all() and torch.isfinite(feats).all()
    assert ((st.lengths >= 3) & (st.lengths <= feats.shape[1])).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_an_fx_extractor_built_before_patching_is_refused_with_the_way_round():
    """timm.create_model(..., features_only=True, feature_cls="fx") traces the dense model at
    creation; patching that graph cannot prune, so patch_timm says to patch first."""
    fx_net = timm.create_model("vit_base_patch16_224", pretrained=False, features_only=True, feature_cls="fx",
                               out_indices=(1, 3), **{k: v for k, v in SMALL.items() if k != "num_classes"})
    with pytest.raises(TypeError, match=r"patch the model first.*FeatureGraphNet\(bus.patch_timm"):
        bus.patch_timm(fx_net, layers=(1,), keep=0.5)
    with pytest.raises(TypeError, match="patch the model first"):
        bus.patch_timm(torch.fx.symbolic_trace(vit()), layers=(1,), keep=0.5)
