"""bus.patch_hf on transformers vision towers built from tiny configs (random weights)."""
import copy
import io

import pytest
import torch

T = pytest.importorskip("transformers")

import bus  # noqa: E402

SIZE = dict(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=4)
TOWERS = {
    "ViTModel": lambda: T.ViTModel(T.ViTConfig(intermediate_size=64, **SIZE)),
    "CLIPVisionModel": lambda: T.CLIPVisionModel(T.CLIPVisionConfig(intermediate_size=64, **SIZE)),
    "SiglipVisionModel": lambda: T.SiglipVisionModel(T.SiglipVisionConfig(intermediate_size=64, **SIZE)),
    "Dinov2Model": lambda: T.Dinov2Model(T.Dinov2Config(mlp_ratio=2, **SIZE)),
}
PREFIX = {"ViTModel": 1, "CLIPVisionModel": 1, "SiglipVisionModel": 0, "Dinov2Model": 1}


def enable_checkpointing(model):
    """transformers >= 5 names it activation_checkpointing_enable (the old name warns)."""
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()


def images(B=2, seed=0):
    return torch.randn(B, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(TOWERS))
def test_keep_one_returns_exactly_the_unpatched_outputs(name):
    torch.manual_seed(0)
    model = TOWERS[name]().eval()
    x = images()
    with torch.no_grad():
        want = model(pixel_values=x)
        bus.patch_hf(model, layers=(1, 2), keep=1.0)
        got, got_text = model(pixel_values=x), model(pixel_values=x, text=torch.randn(2, 32))
    for out in (got, got_text):
        torch.testing.assert_close(out.last_hidden_state, want.last_hidden_state, rtol=0, atol=0)
        torch.testing.assert_close(out.pooler_output, want.pooler_output, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(TOWERS))
def test_pruning_shapes_text_guidance_and_backward(name):
    torch.manual_seed(0)
    model = bus.patch_hf(TOWERS[name]().train(), layers=(1, 2), keep=0.5)
    P = PREFIX[name]
    x = images(3)
    out = model(pixel_values=x)
    # 16 patches -> 8 + fused -> 9 rankable -> 5 + fused
    assert out.last_hidden_state.shape == (3, P + 6, 32)
    free = model.pruning_state()
    assert free.num_prefix == P and len(free.records) == 2 and free.patch_ids.shape == (3, P + 6)
    torch.testing.assert_close(free.records[0]["scores"].sum(-1), torch.ones(3))
    (out.last_hidden_state.square().mean() + out.pooler_output.sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None
               and not n.startswith(("pooler", "head")) and "mask_token" not in n]  # unused without masking
    assert not missing, missing
    with torch.no_grad():
        model(pixel_values=x, text=torch.randn(3, 32) * 5)
        guided = model.pruning_state()
        model(pixel_values=x, text=torch.randn(3, 4, 32), text_mask=torch.tensor([[1, 1, 0, 0]] * 3).bool())
    assert not torch.equal(guided.records[0]["scores"], free.records[0]["scores"])


def test_text_scores_use_the_layers_own_projections():
    """ViT layer 1: the text through layernorm_before + q_proj against the patches' keys, by hand."""
    torch.manual_seed(0)
    model = bus.patch_hf(TOWERS["ViTModel"]().eval(), layers=(1,), keep=0.5)
    seen = {}
    model.layers[1].register_forward_pre_hook(
        lambda m, a, kw: seen.update(x=a[0] if a else kw["hidden_states"]), with_kwargs=True)
    t = torch.randn(2, 32)
    with torch.no_grad():
        model(pixel_values=images(), text=t)
        layer = model.layers[1]
        h, a = layer.layernorm_before(seen["x"]), layer.attention
        q = a.q_proj(layer.layernorm_before(t)).view(2, 1, 4, 8).transpose(1, 2)
        k = a.k_proj(h[:, 1:]).view(2, 16, 4, 8).transpose(1, 2)
        want = (q @ k.transpose(-1, -2) * 8 ** -0.5).softmax(-1).mean(1)[:, 0]
    torch.testing.assert_close(model.pruning_state().records[0]["scores"], want, rtol=1e-5, atol=1e-6)


def test_deepcopy_and_pickle():
    model = bus.patch_hf(TOWERS["CLIPVisionModel"]().train(), layers=(1,), keep=0.5)
    x, t = images(), torch.randn(2, 32)
    model(pixel_values=x, text=t)  # a training forward with its graph alive
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # our own bytes: a whole pickled module
    with torch.no_grad():
        want = model.eval()(pixel_values=x, text=t).last_hidden_state
        for other in (twin, loaded):
            assert type(other) is type(model) and other.pruning_state() is None
            torch.testing.assert_close(other.eval()(pixel_values=x, text=t).last_hidden_state, want, rtol=0, atol=0)


def test_bad_arguments():
    with pytest.raises(TypeError, match="transformers vision tower"):
        bus.patch_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="layers"):
        bus.patch_hf(TOWERS["ViTModel"](), layers=(4,))
    with pytest.raises(ValueError, match="keep"):
        bus.patch_hf(TOWERS["ViTModel"](), keep=0.0)
    with pytest.raises(ValueError, match="class token"):
        bus.patch_hf(TOWERS["SiglipVisionModel"](), layers=(1,), guidance="cls")
    model = bus.patch_hf(TOWERS["ViTModel"](), layers=(1,))
    with pytest.raises(ValueError, match="already patched"):
        bus.patch_hf(model)
    with pytest.raises(ValueError, match="text must be"):
        model(pixel_values=images(), text=torch.randn(2, 31))


@pytest.mark.parametrize("name", list(TOWERS))
def test_gradient_checkpointing_gives_the_same_gradients(name):
    """gradient_checkpointing_enable() on a patched tower: same outputs, records and gradients
    (parameters and text) as without it; only the patched layers' checkpoint is ours."""
    torch.manual_seed(0)
    ref = TOWERS[name]().train()
    ckpt = copy.deepcopy(ref)
    enable_checkpointing(ckpt)
    bus.patch_hf(ref, layers=(1, 2), keep=0.5)
    bus.patch_hf(ckpt, layers=(1, 2), keep=0.5)
    assert all(layer.gradient_checkpointing for layer in bus.hf_patch._find_layers(ckpt))
    x = images(3)
    got = {}
    for label, m in (("ref", ref), ("ckpt", ckpt)):
        t = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]]).bool()
        torch.manual_seed(2)  # the same dropout draws (none at these configs' defaults)
        out = m(pixel_values=x, text=t, text_mask=mask).last_hidden_state
        st = m.pruning_state()
        loss = out.square().mean() + sum(r["scores"].square().sum() for r in st.records)
        loss.backward()
        g = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        got[label] = (out.detach(), st.patch_ids, g, t.grad)
    (o1, i1, g1, t1), (o2, i2, g2, t2) = got["ref"], got["ckpt"]
    torch.testing.assert_close(o2, o1, rtol=0, atol=0)
    assert torch.equal(i2, i1)
    assert g1.keys() == g2.keys() and len(g1) > 10
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-5, atol=1e-6, msg=n)
    torch.testing.assert_close(t2, t1, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_saves_activations_in_patched_layers():
    """The patched layers' checkpoint keeps their activations out of the saved tensors."""
    from test_timm_patch import saved_activation_bytes

    torch.manual_seed(0)
    model = bus.patch_hf(TOWERS["ViTModel"]().train(), layers=(1, 2, 3), keep=0.5)
    x = images(4)
    _, dense = saved_activation_bytes(lambda: model(pixel_values=x).last_hidden_state)
    enable_checkpointing(model)
    _, ckpt = saved_activation_bytes(lambda: model(pixel_values=x).last_hidden_state)
    assert ckpt < 0.5 * dense, (ckpt, dense)


# ----------------------------------------------------------------------------- mass= (padded)
MASS_TOWERS = ["ViTModel", "CLIPVisionModel", "Dinov2Model", "SiglipVisionModel (no head)"]


def mass_tower(name):
    """A tower whose attention is sharp enough (query/key weights of std 0.2, not the configs'
    0.02) that relevance, hence the per-sample counts of mass=, differ between images."""
    if name == "SiglipVisionModel (no head)":
        model = T.SiglipVisionModel(T.SiglipVisionConfig(intermediate_size=64, vision_use_head=False, **SIZE))
    else:
        model = TOWERS[name]()
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "q_proj") and hasattr(mod, "k_proj"):
                torch.nn.init.normal_(mod.q_proj.weight, std=0.2)
                torch.nn.init.normal_(mod.k_proj.weight, std=0.2)
    return model


def real(hidden, lengths):
    return [hidden[b, : int(lengths[b])] for b in range(hidden.shape[0])]


@pytest.mark.parametrize("name", MASS_TOWERS)
def test_mass_batched_equals_each_sample_alone(name):
    """Per-sample counts on a padded batch: every sample's real rows, kept patches and records
    equal those of the same sample run alone (a batch of one has no padding), so the padding is
    never attended; padding rows are zeros. Also with a bound that does not bind."""
    torch.manual_seed(0)
    base = mass_tower(name).eval()
    P = 0 if name.startswith("Siglip") else 1
    x = images(4)
    text = torch.randn(4, 3, 32, generator=torch.Generator().manual_seed(1)) * 3
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 0, 1]]).bool()
    for bound in (None, 1.0):
        model = bus.patch_hf(copy.deepcopy(base), layers=(1, 2), mass=0.5, min_keep=2, max_keep=bound)
        for kw in (dict(), dict(text=text, text_mask=mask)):
            with torch.no_grad():
                hidden = model(pixel_values=x, **kw).last_hidden_state
            st = model.pruning_state()
            first = (st.records[1]["patch_ids"] >= 0).sum(1).tolist()  # counts kept at layer 1
            assert len(set(st.lengths.tolist())) > 1 or len(set(first)) > 1, "counts must differ here"
            for b in range(4):
                L = int(st.lengths[b])
                assert not hidden[b, L:].any() and (st.patch_ids[b, L:] == -1).all()
                one = {k: v[b:b + 1] for k, v in kw.items()}
                with torch.no_grad():
                    alone = model(pixel_values=x[b:b + 1], **one).last_hidden_state[0]
                sa = model.pruning_state()
                assert int(sa.lengths[0]) == L and alone.shape[0] == (L if bound is None else hidden.shape[1])
                torch.testing.assert_close(hidden[b, :L], alone[:L], rtol=1e-4, atol=1e-5)
                assert torch.equal(st.patch_ids[b, :L], sa.patch_ids[0, :L])
                kept = [i for i in st.patch_ids[b, P:L - 1].tolist() if i >= 0]  # the patches, in order
                assert kept == sorted(kept) and len(set(kept)) == len(kept)
                n1 = min(sa.records[1]["scores"].shape[1], st.records[1]["scores"].shape[1])
                torch.testing.assert_close(st.records[1]["scores"][b, :n1], sa.records[1]["scores"][0, :n1],
                                           rtol=1e-4, atol=1e-6)


def test_mass_bound_clamps_counts_and_fixes_shapes():
    torch.manual_seed(0)
    base = mass_tower("ViTModel").eval()
    free = bus.patch_hf(copy.deepcopy(base), layers=(1,), mass=0.95)
    bounded = bus.patch_hf(base, layers=(1,), mass=0.95, max_keep=4)
    x = images(3)
    with torch.no_grad():
        free(pixel_values=x)
        hidden = bounded(pixel_values=x).last_hidden_state
    want = free.pruning_state().lengths - 2
    assert (want > 4).any()
    assert hidden.shape == (3, 1 + 4 + 1, 32)
    assert torch.equal(bounded.pruning_state().lengths - 2, want.clamp(max=4))
    scores = bounded.pruning_state().records[0]["scores"]
    for b in range(3):
        k = int(bounded.pruning_state().lengths[b]) - 2
        top = torch.sort(scores[b], descending=True, stable=True).indices[:k]
        assert bounded.pruning_state().patch_ids[b, 1:1 + k].tolist() == sorted(top.tolist())


def test_mass_gradient_checkpointing_and_backward():
    torch.manual_seed(0)
    ref = bus.patch_hf(mass_tower("CLIPVisionModel").train(), layers=(1, 2), mass=0.6, max_keep=0.75)
    ckpt = copy.deepcopy(ref)
    enable_checkpointing(ckpt)
    x, t = images(3), torch.randn(3, 32)
    grads = []
    for m in (ref, ckpt):
        out = m(pixel_values=x, text=t)
        (out.last_hidden_state.square().mean() + out.pooler_output.sum()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_mass_bad_arguments():
    with pytest.raises(ValueError, match="patch_hf: max_keep"):
        bus.patch_hf(TOWERS["ViTModel"](), layers=(1,), max_keep=4)
    with pytest.raises(ValueError, match="max_keep"):
        bus.patch_hf(TOWERS["ViTModel"](), layers=(1,), mass=0.5, max_keep=0)
    with pytest.raises(ValueError, match="mass"):
        bus.patch_hf(TOWERS["ViTModel"](), layers=(1,), mass=1.5)
    with pytest.raises(ValueError, match="attention-pool head"):
        bus.patch_hf(TOWERS["SiglipVisionModel"](), layers=(1,), mass=0.5)
