"""The model layer's TSPS / patch_timm / PAD on small timm ViTs with random weights."""
import pytest
import torch

timm = pytest.importorskip("timm")

import bus  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402


def tiny_vit(**kw):
    """A 6-block, width-64 ViT at 64 px (16 patches of 16 px): fast on CPU."""
    cfg = dict(img_size=64, patch_size=16, embed_dim=64, depth=6, num_heads=4, num_classes=10)
    cfg.update(kw)
    return VisionTransformer(**cfg).eval()


def images(B=3, size=64, seed=0):
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "factory",
    [
        lambda: tiny_vit(),
        lambda: tiny_vit(reg_tokens=4),  # num_prefix = 5
        lambda: tiny_vit(qk_norm=True, init_values=1e-2),  # q/k norms and LayerScale
        lambda: tiny_vit(global_pool="avg"),
        lambda: timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10).eval(),
    ],
)
def test_keep_one_equals_unpatched(factory):
    torch.manual_seed(0)
    model = factory()
    x = images(2, model.patch_embed.img_size[0])
    with torch.no_grad():
        want = model(x)
        bus.patch_timm(model, layers=(1, 3), keep=1.0)
        got = model(x)
        got_text = model(x, text=torch.randn(2, model.embed_dim))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_text, want, rtol=0, atol=0)


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_fixed_keep_shapes_and_sizes(reg_tokens):
    model = tiny_vit(reg_tokens=reg_tokens)
    P = model.num_prefix_tokens
    bus.patch_timm(model, layers=(1, 3), keep=0.5)
    with torch.no_grad():
        f = model.forward_features(images(3), text=torch.randn(3, 64))
    # 16 patches -> 8 kept + fused -> n = 9 -> 5 kept + fused
    assert f.shape == (3, P + 5 + 1, 64)
    state = model.pruning_state()
    assert len(state.records) == 2
    # sizes always add up to the number of patches, prefix tokens count 1 each
    torch.testing.assert_close(state.sizes[:, P:].sum(1), torch.full((3,), 16.0))
    # kept tokens are distinct original patches (or the first layer's fused token, id -1)
    kept = state.patch_ids[:, P:-1]
    assert ((kept >= -1) & (kept < 16)).all() and (state.patch_ids[:, -1] == -1).all()
    for row in kept.tolist():
        real = [i for i in row if i >= 0]
        assert len(real) == len(set(real)) and len(row) - len(real) <= 1


def test_text_guidance_changes_the_choice():
    model = tiny_vit()
    bus.patch_timm(model, layers=(2,), keep=0.25, guidance="auto")
    x = images(2)
    with torch.no_grad():
        model(x)
        cls_ids = model.pruning_state().patch_ids.clone()
        model(x, text=torch.randn(2, 64) * 5)
        text_ids = model.pruning_state().patch_ids.clone()
        model(x, text=torch.randn(2, 3, 64), text_mask=torch.tensor([[True, False, True], [True, True, True]]))
    assert not torch.equal(cls_ids, text_ids)


def test_varlen_path_equals_fixed_path_when_counts_agree():
    """mass tiny + min_keep=K keeps K per sample: the packed path (select_tokens_varlen,
    varlen_attention, proportional attention) must reproduce the fixed path."""
    torch.manual_seed(0)
    fixed, packed = tiny_vit(), tiny_vit()
    packed.load_state_dict(fixed.state_dict())
    bus.patch_timm(fixed, layers=(1, 3), keep=6)
    bus.patch_timm(packed, layers=(1, 3), mass=1e-6, min_keep=6)
    x, t = images(3), torch.randn(3, 64)
    with torch.no_grad():
        want, got = fixed.forward_features(x, text=t), packed.forward_features(x, text=t)
    state = packed.pruning_state()
    assert state.lengths.tolist() == [8, 8, 8]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_mass_mode_runs_packed_and_backpropagates():
    model = tiny_vit().train()
    bus.patch_timm(model, layers=(1, 3), mass=0.6, ptm_head=True)
    out = model(images(4), text=torch.randn(4, 64))
    state = model.pruning_state()
    assert state.lengths is not None and out.shape == (4, 10)
    loss = out.square().mean() + sum(r["ptm_logits"].square().mean() for r in state.records)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_bad_arguments():
    with pytest.raises(TypeError, match="expected a timm VisionTransformer"):
        bus.patch_timm(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="layers"):
        bus.patch_timm(tiny_vit(), layers=(9,))
    with pytest.raises(ValueError, match="global_pool='token'"):
        bus.patch_timm(tiny_vit(global_pool="avg"), layers=(1,), mass=0.5)
    model = bus.patch_timm(tiny_vit(), layers=(1,), keep=0.5)
    with pytest.raises(ValueError, match="already patched"):
        bus.patch_timm(model)
    with pytest.raises(ValueError, match="text must be"):
        model(images(2), text=torch.randn(2, 63))
    with pytest.raises(ValueError, match="keep"):
        bus.TSPS(64, keep=0)
    with pytest.raises(ValueError, match="guidance='cls' needs a class token"):
        bus.patch_timm(tiny_vit(class_token=False, global_pool="avg"), layers=(1,), keep=0.5, guidance="cls")
    with pytest.raises(ValueError, match="guidance='image'"):
        bus.TSPS(64, guidance="image")


def test_pad_shapes_and_padding_mask():
    pad = bus.PAD(64, num_queries=8, depth=2, num_heads=4).eval()
    tokens = torch.randn(2, 10, 64)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, 6:] = True
    out = pad(tokens, mask)
    assert out.shape == (2, 8, 64)
    # padding rows do not matter
    tokens2 = tokens.clone()
    tokens2[1, 6:] = 100.0
    torch.testing.assert_close(pad(tokens2, mask), out)


@pytest.mark.parametrize("bus_model", [True, False])
@pytest.mark.parametrize("mass", [None, 0.7])
@pytest.mark.parametrize("guidance", ["image", "text"])
def test_bus_model_losses_reach_every_parameter(bus_model, mass, guidance):
    pytest.importorskip("transformers")
    from bus.model import BUSConfig, BUSModel

    if guidance == "text" and not bus_model:
        pytest.skip("the baseline has no selector to guide")
    torch.manual_seed(0)
    model = BUSModel(BUSConfig.tiny(vocab_size=40, mass=mass, guidance=guidance), bus=bus_model).train()
    ids = torch.randint(5, 40, (4, 7))
    ids[:, 0] = 2
    am = torch.ones(4, 7, dtype=torch.long)
    am[2, 4:] = 0
    batch = dict(images=images(4), input_ids=ids, attention_mask=am, patch_labels=(torch.rand(4, 16) < 0.4).float())
    vit_calls = []
    orig = model.vision.forward_features
    model.vision.forward_features = lambda *a, **kw: vit_calls.append(kw.get("text")) or orig(*a, **kw)
    losses = model(batch)
    want = {"itc", "itm", "lm", "ptm", "loss"} | ({"itc_free"} if bus_model and guidance == "text" else set())
    assert want <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    # guidance="image": one text-free ViT pass per step; "text": a CLS-guided and a caption-guided one
    if guidance == "image":
        assert len(vit_calls) == 1 and vit_calls[0] is None
    else:
        assert len(vit_calls) == 2 and vit_calls[0] is None and vit_calls[1] is not None
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    emb = model.image_embedding(images(4))
    assert emb.shape == (4, model.config.embed_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))


@pytest.mark.parametrize("bus_model", [True, False])
def test_captioning_loss_sees_no_future_token(bus_model):
    """The LM logits at positions before m do not change when caption token m does (the fusion ran
    causally over the bidirectional text encoder's output, whose token m - 1 already held token m)."""
    pytest.importorskip("transformers")
    from bus.model import BUSConfig, BUSModel

    torch.manual_seed(0)
    model = BUSModel(BUSConfig.tiny(vocab_size=40), bus=bus_model).eval()  # eval: no dropout
    got = []
    model.lm_head.register_forward_hook(lambda mod, inp, out: got.append(out.detach()))
    ids = torch.randint(5, 40, (3, 9))
    ids[:, 0] = 2
    batch = dict(images=images(3), input_ids=ids, attention_mask=torch.ones(3, 9, dtype=torch.long))
    m = 5
    changed = ids.clone()
    changed[:, m] = 5 + (ids[:, m] - 5 + 7) % 35  # another word at position m
    with torch.no_grad():
        model(batch)
        model(dict(batch, input_ids=changed))
    a, b = got
    torch.testing.assert_close(a[:, :m], b[:, :m], rtol=0, atol=0)
    assert not torch.equal(a[:, m:], b[:, m:])  # the change is seen from position m on


def test_bus_config_rejects_unknown_guidance():
    pytest.importorskip("transformers")
    from bus.model import BUSConfig, BUSModel

    with pytest.raises(ValueError, match="guidance='caption' must be 'image' or 'text'"):
        BUSModel(BUSConfig.tiny(vocab_size=40, guidance="caption"))


@pytest.mark.parametrize("mass", [None, 0.7])
def test_ptm_trains_the_selector_ranking(mass):
    """PTM is minus the log of the relevance share on the named patches: zero when every known
    patch is named, skipped without labels, and its gradient reaches the query/key projection the
    selector ranks by (a separate per-patch head would leave the ranking untouched)."""
    pytest.importorskip("transformers")
    from bus.model import BUSConfig, BUSModel

    torch.manual_seed(0)
    cfg = BUSConfig.tiny(vocab_size=40, mass=mass)
    model = BUSModel(cfg, bus=True).train()
    x = images(3)
    model.encode_image(x)
    labels = (torch.rand(3, 16) < 0.4).float()
    labels[0, :4] = 1.0
    labels[1] = -1.0  # unknown everywhere: sample 1 is left out
    ptm = model._ptm_loss(labels)
    # by hand, from the recorded scores and patch ids
    terms = []
    for rec in model.vision.pruning_state().records:
        s, ids = rec["scores"].detach().float(), rec["patch_ids"]
        lab = labels.gather(1, ids.clamp(min=0))
        known, per = (ids >= 0) & (lab >= 0), []
        for b in range(3):
            pos = known[b] & (lab[b] > 0)
            if pos.any():
                per.append(-torch.log(s[b][pos].sum() / s[b][known[b]].sum()))
        terms.append(torch.stack(per).mean())
    torch.testing.assert_close(ptm.detach(), torch.stack(terms).mean())
    assert ptm > 0
    first = model.vision.blocks[cfg.tsps_layers[0]].attn.qkv.weight
    (g,) = torch.autograd.grad(ptm, first)
    assert g.abs().sum() > 0
    assert model._ptm_loss(torch.ones(3, 16)) == 0  # all named: the whole share is on them
    assert model._ptm_loss(torch.full((3, 16), -1.0)) == 0  # nothing known: no term
