"""The paper's stack (BUSConfig.paper / paper_tiny, arch="mplug") and its losses, at the tiny size."""
import copy

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("transformers")

from bus.model import BUSConfig, BUSModel  # noqa: E402
from bus.models import losses as L  # noqa: E402
from bus.models.mplug import MPLUGModel  # noqa: E402

VOCAB = 40


def make_batch(B=4, L_=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (B, L_), generator=g)
    ids[:, 0] = 2
    am = torch.ones(B, L_, dtype=torch.long)
    lengths = torch.randint(3, L_ + 1, (B,), generator=g)
    lengths[0] = L_
    for b, n in enumerate(lengths.tolist()):
        ids[b, n - 1] = 3
        am[b, n:] = 0
        ids[b, n:] = 0
    return dict(images=torch.randn(B, 3, 64, 64, generator=g), input_ids=ids, attention_mask=am,
                patch_labels=(torch.rand(B, 16, generator=g) < 0.4).float())


def model(bus=True, seed=0, **over):
    torch.manual_seed(seed)
    return BUSModel(BUSConfig.paper_tiny(vocab_size=VOCAB, **over), bus=bus).train()


PAPER = dict(text_guided_from=0, itc_on="rest", itm_negatives="guided")  # every TSPS layer text-guided
CASES = [(True, "text", {}), (True, "text", PAPER), (True, "text", dict(itm_negatives="guided")),
         (True, "text", dict(itc_on="rest")), (True, "image", {}), (False, "text", {})]


@pytest.mark.parametrize("bus,guidance,over", CASES)
def test_every_loss_reaches_its_parameters(bus, guidance, over):
    m = model(bus, guidance=guidance, **over)
    assert isinstance(m, MPLUGModel)
    losses = m(make_batch())
    assert set(losses) == {"itc", "itm", "mlm", "lm", "ptm", "loss"}
    assert all(v.dtype == torch.float32 and v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    named = dict(m.named_parameters())
    l0 = m.config.tsps_layers[0]
    want = {
        "itc": ["vision.vit.patch_embed.proj.weight", "vision_proj.weight", "text.bert.embeddings.word_embeddings.weight",
                "text_proj.weight", "logit_scale"],
        "itm": ["itm_head.weight", "fusion.layers.0.crossattention.self.key.weight", "fusion.layers.3.attention.self.query.weight",
                "vision.vit.blocks.5.mlp.fc1.weight", "text.bert.encoder.layer.1.output.dense.weight"],
        "mlm": ["mlm_head.head.predictions.transform.dense.weight", "mlm_head.head.predictions.bias",
                "fusion.layers.1.intermediate.dense.weight", "text.bert.embeddings.word_embeddings.weight"],
        "lm": ["decoder.lm.bert.encoder.layer.1.crossattention.self.value.weight", "decoder.lm.cls.predictions.bias",
               "fusion.layers.3.output.dense.weight", "vision.vit.blocks.0.attn.qkv.weight"],
    }
    if bus:
        want["itm"].append("vision.pad.queries")
        want["lm"].append("vision.pad.blocks.0.cross_attn.in_proj_weight")
        want["ptm"] = [f"vision.vit.blocks.{l0}.attn.qkv.weight"]
        if guidance == "text":  # the caption's [CLS] steers the selector: ITM reaches the text encoder that way too
            want["itm"].append("text.bert.embeddings.word_embeddings.weight")
    else:
        assert m.vision.pad is None and not m.vision.layers
        assert losses["ptm"] == 0
    for name, params in want.items():
        grads = torch.autograd.grad(losses[name], [named[p] for p in params], retain_graph=True, allow_unused=True)
        for p, g in zip(params, grads):
            assert g is not None and g.abs().sum() > 0, f"{name} does not reach {p}"
    losses["loss"].backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, missing
    frozen = [n for n, p in m.named_parameters() if n.split(".")[0] in ("vision_m", "text_m", "vision_proj_m", "text_proj_m")]
    assert frozen and all(not named[n].requires_grad and named[n].grad is None for n in frozen)


def test_momentum_update_is_the_exact_ema():
    m = model(momentum=0.9)
    with torch.no_grad():  # make online and momentum weights differ
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    pairs = list(m.momentum_pairs())
    assert len(pairs) > 50
    name_of = {id(p): n for n, p in m.named_parameters()}
    m(make_batch())
    for p, p_m in pairs:
        old, online = before[name_of[id(p_m)]], before[name_of[id(p)]]
        torch.testing.assert_close(p_m, old * 0.9 + online * (1 - 0.9), rtol=0, atol=0)
    m.eval()  # no update outside training
    snap = {n: p.detach().clone() for n, p in m.named_parameters()}
    m(make_batch())
    assert all(torch.equal(p, snap[n]) for n, p in m.named_parameters())


def test_feature_queue_ring_buffer():
    q = L.FeatureQueue(5, 2)
    assert not q.features()[2].any()
    a = torch.arange(6.0).reshape(3, 2)
    q.enqueue(a, -a)
    img, txt, valid = q.features()
    assert valid.tolist() == [True] * 3 + [False] * 2
    assert torch.equal(img[:3], a) and torch.equal(txt[:3], -a) and int(q.ptr) == 3 and int(q.filled) == 3
    b = torch.arange(6.0, 12.0).reshape(3, 2)
    q.enqueue(b, -b)  # wraps: slots 3, 4, 0
    assert int(q.ptr) == 1 and int(q.filled) == 5
    assert torch.equal(q.image, torch.stack([b[2], a[1], a[2], b[0], b[1]]))
    big = torch.arange(14.0).reshape(7, 2)
    q.enqueue(big, big)  # more rows than slots: the last 5, from slot 1
    assert int(q.ptr) == 1 and torch.equal(q.image[[1, 2, 3, 4, 0]], big[2:])
    with pytest.raises(ValueError, match="size"):
        L.FeatureQueue(-1, 2)


def test_model_fills_its_queue_and_resumes_it_from_the_state_dict():
    m = model(queue_size=6)
    m(make_batch(seed=1))
    assert int(m.queue.filled) == 4
    m(make_batch(seed=2))
    assert int(m.queue.filled) == 6 and int(m.queue.ptr) == 2
    # the queue is the momentum features, normalised
    torch.testing.assert_close(m.queue.image.norm(dim=1), torch.ones(6))
    sd = m.state_dict()
    assert {"queue.image", "queue.text", "queue.ptr", "queue.filled"} <= set(sd)
    m2 = model(seed=5, queue_size=6)
    m2.load_state_dict(sd)
    assert torch.equal(m2.queue.image, m.queue.image) and int(m2.queue.ptr) == 2


@pytest.mark.parametrize("batch", ["online", "momentum"])
def test_itc_distill_loss_by_hand(batch):
    torch.manual_seed(0)
    B, Q, E = 3, 4, 8
    n = lambda t: torch.nn.functional.normalize(t, dim=-1)  # noqa: E731
    img, txt, img_m, txt_m = (n(torch.randn(B, E)) for _ in range(4))
    q = L.FeatureQueue(Q + 2, E)  # two slots still empty: they must not count
    q.enqueue(n(torch.randn(Q, E)), n(torch.randn(Q, E)))
    scale, alpha = torch.tensor(5.0), 0.4
    loss, sim = L.itc_distill_loss(img, txt, img_m, txt_m, q, scale, alpha, batch=batch)
    # scored candidates: the batch (online or momentum) + the queue; targets: momentum features only
    img_b, txt_b = (img, txt) if batch == "online" else (img_m, txt_m)
    img_all, txt_all = torch.cat([img_b, q.image[:Q]]), torch.cat([txt_b, q.text[:Q]])
    img_all_m, txt_all_m = torch.cat([img_m, q.image[:Q]]), torch.cat([txt_m, q.text[:Q]])
    total = 0.0
    for a, a_m, other, other_m in ((img, img_m, txt_all, txt_all_m), (txt, txt_m, img_all, img_all_m)):
        for b in range(B):
            onehot = torch.zeros(B + Q)
            onehot[b] = 1
            target = alpha * torch.softmax(scale * a_m[b] @ other_m.t(), 0) + (1 - alpha) * onehot
            total = total - (torch.log_softmax(scale * a[b] @ other.t(), 0) * target).sum() / B
    torch.testing.assert_close(loss, total / 2)
    torch.testing.assert_close(sim, scale * img @ txt_b.t())
    img.requires_grad_(True)
    txt.requires_grad_(True)
    L.itc_distill_loss(img, txt, img_m, txt_m, q, scale, alpha, batch=batch)[0].backward()
    assert torch.isfinite(img.grad).all() and torch.isfinite(txt.grad).all()
    # alpha = 0 and an empty queue: in-batch cross-entropy
    loss0, _ = L.itc_distill_loss(img, txt, img_m, txt_m, L.FeatureQueue(0, E), scale, 0.0, batch=batch)
    ce = torch.nn.functional.cross_entropy
    t = torch.arange(B)
    torch.testing.assert_close(loss0, (ce(scale * img @ txt_b.t(), t) + ce(scale * txt @ img_b.t(), t)) / 2)
    with pytest.raises(ValueError, match="batch"):
        L.itc_distill_loss(img, txt, img_m, txt_m, q, scale, alpha, batch="queue")


def test_online_itc_reaches_both_encoders_from_each_direction():
    """batch="online": the image->text term alone moves the text features too (CLIP-style);
    "momentum" (ALBEF) leaves the text side without gradient from that term."""
    torch.manual_seed(1)
    B, E = 4, 8
    n = lambda t: torch.nn.functional.normalize(t, dim=-1)  # noqa: E731
    img_m, txt_m = n(torch.randn(B, E)), n(torch.randn(B, E))
    for batch, reaches in (("online", True), ("momentum", False)):
        img, txt = n(torch.randn(B, E)).requires_grad_(True), n(torch.randn(B, E)).requires_grad_(True)
        _, sim = L.itc_distill_loss(img, txt, img_m, txt_m, L.FeatureQueue(0, E), torch.tensor(5.0), 0.0,
                                    batch=batch)
        i2t = torch.nn.functional.cross_entropy(sim, torch.arange(B))  # the i2t term, as the loss computes it
        (g,) = torch.autograd.grad(i2t, txt, allow_unused=True)
        assert (g is not None and g.abs().sum() > 0) == reaches, batch


def test_width_scaled_init():
    """init_std None: 0.02 * sqrt(768 / width) per tower (0.02 at the paper's 768, unchanged there)."""
    cfg = BUSConfig.paper_tiny(vocab_size=VOCAB, text_width=32)
    assert cfg.weight_init_std(768) == 0.02 and abs(cfg.weight_init_std(64) - 0.02 * 12 ** 0.5) < 1e-12
    torch.manual_seed(0)
    m = BUSModel(cfg, bus=False)
    qkv = m.vision.vit.blocks[0].attn.qkv.weight
    assert abs(qkv.std().item() - cfg.weight_init_std(64)) < 0.1 * cfg.weight_init_std(64)
    q = m.text.bert.encoder.layer[0].attention.self.query.weight
    assert abs(q.std().item() - cfg.weight_init_std(32)) < 0.1 * cfg.weight_init_std(32)
    assert torch.equal(m.vision_m.vit.blocks[0].attn.qkv.weight, qkv)  # the momentum copy starts equal
    fixed = BUSModel(BUSConfig.paper_tiny(vocab_size=VOCAB, init_std=0.02), bus=False)
    assert abs(fixed.vision.vit.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    with pytest.raises(ValueError, match="init_std"):
        BUSModel(BUSConfig.paper_tiny(vocab_size=VOCAB, init_std=0.0))


def test_hard_negatives_never_pick_the_positive():
    torch.manual_seed(0)
    for B in (2, 5):
        sim = torch.randn(B, B) * 10
        for _ in range(20):
            nt, ni = L.hard_negatives(sim)
            assert (nt != torch.arange(B)).all() and (ni != torch.arange(B)).all()
    nt, _ = L.hard_negatives(torch.full((3, 3), -1e4).fill_diagonal_(1e4))  # all weight on the positive
    assert (nt != torch.arange(3)).all()


def test_mask_tokens():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (64, 40), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    am = torch.ones_like(ids)
    am[:, 30:] = 0
    out, labels = L.mask_tokens(ids, am, prob=0.15, mask_id=4, vocab_size=1000, special_below=5, generator=g)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, 30:].any()  # [CLS] and padding never masked
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(out[~chosen], ids[~chosen])
    rate = chosen[:, 1:30].float().mean()
    assert 0.12 < rate < 0.18, rate
    frac_mask = (out[chosen] == 4).float().mean()
    assert 0.7 < frac_mask < 0.9
    assert (out >= 0).all() and (out < 1000).all()


def test_prefix_split():
    ids = torch.tensor([[2, 11, 12, 13, 14, 3], [2, 21, 3, 0, 0, 0], [2, 3, 0, 0, 0, 0]])
    am = (ids != 0).long()
    am[2, 1] = 1
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        p_ids, p_mask, d_ids, d_mask = L.prefix_split(ids, am, bos_id=2, pad_id=0, generator=g)
        for b in range(3):
            prefix = p_ids[b][p_mask[b] > 0].tolist()
            dec = d_ids[b][d_mask[b] > 0].tolist()
            real = ids[b][am[b] > 0].tolist()
            assert prefix[0] == 2 and dec[0] == 2
            assert prefix + dec[1:] == real  # the prefix and the predicted suffix tile the caption
            assert dec[-1] == 3 and len(dec) >= 2  # at least one token to predict, ending with [SEP]
            if len(real) > 2:
                assert len(dec) >= 3  # at least one word in the suffix
            assert (p_ids[b][p_mask[b] == 0] == 0).all() and (d_ids[b][d_mask[b] == 0] == 0).all()


@pytest.mark.parametrize("over", [{}, PAPER, dict(text_guided_from=1, itc_on="stem", itm_negatives="guided")])
def test_retrieval_embedding_is_text_free(over):
    """The ITC / retrieval image feature never sees a caption: in training its input (the ViT's
    CLS-guided [CLS] token) is the same whatever the batch's captions, equals image_embedding's,
    while the visual tokens the fusion gets do change with the caption (text guidance)."""
    m = model(guidance="text", **over).eval()  # eval: no dropout, no momentum update, deterministic
    seen = []
    h = m.vision_proj.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    a, b = make_batch(seed=0), make_batch(seed=0)
    b["input_ids"] = make_batch(seed=7)["input_ids"]
    b["attention_mask"] = make_batch(seed=7)["attention_mask"]
    guided = []
    for batch in (a, b):
        torch.manual_seed(0)
        with torch.no_grad():
            m(batch)
        guided.append(m.vision.pruning_state().records[-1]["scores"].clone())
    with torch.no_grad():
        emb = m.image_embedding(a["images"])
    h.remove()
    assert len(seen) == 3
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[0], seen[2])
    torch.testing.assert_close(emb, torch.nn.functional.normalize(m.vision_proj(seen[0]), dim=-1))
    # the captions did steer the selector of the fusion's tokens (at random init a text [CLS]
    # barely depends on the words, so the relevance, not yet the choice, is what differs)
    rows = 4 if m.config.itm_negatives == "reuse" else 12
    assert guided[0].shape[0] == rows and (guided[0] - guided[1]).abs().max() > 1e-6


def test_fusion_connected_layer_updates_the_visual_tokens():
    from bus.models.fusion import SkipConnectedFusion
    from bus.models.text import bert_config

    cfg = BUSConfig.paper_tiny(vocab_size=VOCAB)
    torch.manual_seed(0)
    mk = lambda every: SkipConnectedFusion(bert_config(cfg, width=64, heads=4, layers=1, decoder=True),  # noqa: E731
                                           bert_config(cfg, width=64, heads=4, layers=1), 4, every).eval()
    text, image = torch.randn(2, 5, 64), torch.randn(2, 7, 64)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 3:] = False
    f = mk(3)
    assert f.connected == [False, False, False, True]
    with torch.no_grad():
        img_out, txt_out = f(text, valid, image)
        assert not torch.allclose(img_out, image)
        # padded text tokens are masked out: changing them changes no real token's output
        text2 = text.clone()
        text2[1, 3:] = 50.0
        img2, txt2 = f(text2, valid, image)
        torch.testing.assert_close(img2, img_out)
        torch.testing.assert_close(txt2[1, :3], txt_out[1, :3])
        torch.testing.assert_close(txt2[0], txt_out[0])
        img_none, _ = mk(100)(text, valid, image)  # no connected layer: the image is never updated
    assert torch.equal(img_none, image)


def test_decoder_is_causal():
    m = model().eval()
    ids = torch.randint(5, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    mem, mem_mask = torch.randn(2, 5, 64), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        a = m.decoder(ids, mask, mem, mem_mask)
        ids2 = ids.clone()
        ids2[:, 4:] = 7
        b = m.decoder(ids2, mask, mem, mem_mask)
    assert a.shape == (2, 6, VOCAB)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_baseline_vs_bus_memory_and_shapes():
    base, bus = model(False), model(True)
    images = make_batch()["images"]
    with torch.no_grad():
        tb, _ = base.vision(images)
        tv, _ = bus.vision(images)
        mb, _ = base._fuse_memory(tb, None)
        mv, _ = bus._fuse_memory(tv, None)
    assert tb.shape == (4, 17, 64)  # [CLS] + 16 patches
    assert tv.shape[1] < tb.shape[1]  # pruned: 16 -> 12 -> 9 -> 7 kept, + [CLS] + fused
    assert mb.shape == (4, 17, 64) and mv.shape == (4, bus.config.pad_queries, 64)
    for m in (base, bus):
        e = m.image_embedding(images)
        assert e.shape == (4, 32)
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(4))
        batch = make_batch()
        assert m.itm_scores(images, batch["input_ids"], batch["attention_mask"]).shape == (4,)
        assert m.text_embedding(batch["input_ids"], batch["attention_mask"]).shape == (4, 32)


def test_text_width_differs_from_vit_width():
    m = model(text_width=32)
    losses = m(make_batch())
    losses["loss"].backward()
    assert m.guide_proj.weight.shape == (64, 32) and m.guide_proj.weight.grad.abs().sum() > 0
    assert m.visual_fc[0].weight.grad.abs().sum() > 0


def test_config_round_trip_deepcopy_and_bad_values():
    cfg = BUSConfig.paper_tiny(vocab_size=VOCAB)
    assert BUSConfig(**cfg.to_dict()) == cfg
    m = BUSModel(BUSConfig(**cfg.to_dict()), bus=True)
    assert isinstance(m, MPLUGModel) and isinstance(m, BUSModel)
    m2 = copy.deepcopy(m)
    assert isinstance(m2, MPLUGModel)
    for (n, p), (n2, p2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert n == n2 and torch.equal(p, p2)
    with pytest.raises(ValueError, match="mass=None"):
        BUSModel(BUSConfig.paper_tiny(vocab_size=VOCAB, mass=0.7))
    for bad, msg in [(dict(guidance="caption"), "guidance"), (dict(momentum=1.5), "momentum"),
                     (dict(mlm_prob=0.0), "mlm_prob"), (dict(text_guided_from=3), "text_guided_from"), (dict(text_guided_from=-4), "text_guided_from"),
                     (dict(distill_alpha=-1), "distill_alpha"), (dict(connect_every=0), "connect_every"),
                     (dict(arch="other"), "arch"),
                     (dict(itm_negatives="x"), "itm_negatives"), (dict(itc_on="x"), "itc_on"),
                     (dict(itc_batch="x"), "itc_batch")]:
        with pytest.raises(ValueError, match=msg):
            BUSModel(BUSConfig.paper_tiny(vocab_size=VOCAB, **bad))
    with pytest.raises(ValueError, match="at least 2"):
        model()(make_batch(B=1))


def test_mass_mode_runs_packed():
    m = model(mass=0.7, text_guided_from=0)
    losses = m(make_batch())
    assert m.vision.pruning_state().lengths is not None
    losses["loss"].backward()


def test_paper_preset_structure():
    """The full-size preset, built on the meta device (no memory, no init cost)."""
    cfg = BUSConfig.paper()
    with torch.device("meta"):
        m = BUSModel(cfg, bus=True)
        base = BUSModel(cfg, bus=False)
    vit = m.vision.vit
    assert vit.patch_embed.num_patches == 256 and vit.embed_dim == 768 and len(vit.blocks) == 12
    assert type(vit.norm_pre).__name__ != "Identity"  # CLIP-style pre-norm
    assert len(m.text.bert.encoder.layer) == 6 and len(m.decoder.lm.bert.encoder.layer) == 12
    assert m.fusion.connected == [False, False, False, True, False, False]
    assert hasattr(m.decoder.lm.bert.encoder.layer[0], "crossattention")
    assert m.vision.layers == (4, 7, 10) and m.vision.pad.queries.shape == (1, 64, 768)
    assert m.queue.image.shape == (65536, 256) and cfg.momentum == 0.995 and cfg.guidance == "text"
    assert m.vision.split == 10 and m.itc_from_stem  # blocks 0-9 shared, the caption guides block 10
    n_bus = sum(p.numel() for p in m.parameters() if p.requires_grad)
    n_base = sum(p.numel() for p in base.parameters() if p.requires_grad)
    assert 0 < n_bus - n_base < 20e6  # PAD (2 blocks + queries)


def test_flop_count_on_meta_equals_cpu():
    """benchmarks/flops.py counts on the meta device (shapes only); the counts equal real tensors'."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import flops

    cfg = BUSConfig.paper_tiny(vocab_size=VOCAB, text_layers=1, decoder_layers=1, fusion_layers=2, connect_every=1)
    meta = flops.count(cfg, True, 2)
    m = flops.build(cfg, True, device="cpu")
    batch = flops.paper_batch(cfg, 2)
    cpu = (flops.step_flops(m, batch), flops.vit_flops(m, batch["images"]),
           {p: v[0] for p, v in flops.forward_parts(m, batch).items()})
    assert meta == cpu and meta[0] > 3 * meta[2]["total"] * 0.9 > 0


_DDP_QUEUE_WORKER = r'''
import sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from bus.model import BUSConfig, BUSModel
from bus.models import losses as L

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
seen = []  # this rank's momentum features (img_m, txt_m), as ITC receives them
_itc = L.itc_distill_loss
L.itc_distill_loss = lambda *a, **k: (seen.append([a[2].clone(), a[3].clone()]), _itc(*a, **k))[1]

torch.manual_seed(0)
cfg = BUSConfig.paper_tiny(vocab_size=40, img_size=32, vit_kwargs={"patch_size": 8, "depth": 2},
                           tsps_layers=(1,), text_layers=1, fusion_layers=2, connect_every=1,
                           decoder_layers=1, queue_size=64)
model = BUSModel(cfg, bus=False).train()
net = DDP(model)  # broadcast_buffers=True: rank 0's queue is copied to every rank before each forward
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
B = 3
for step in range(2):
    g = torch.Generator().manual_seed(100 * rank + step)  # each rank its own data
    ids = torch.randint(5, 40, (B, 7), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    batch = dict(images=torch.randn(B, 3, 32, 32, generator=g), input_ids=ids,
                 attention_mask=torch.ones(B, 7, dtype=torch.long))
    opt.zero_grad()
    net(batch)["loss"].backward()
    opt.step()
everyone = [None] * world
dist.all_gather_object(everyone, [[t.tolist() for t in s] for s in seen])
want_img = torch.cat([torch.tensor(everyone[r][s][0]) for s in range(2) for r in range(world)])
want_txt = torch.cat([torch.tensor(everyone[r][s][1]) for s in range(2) for r in range(world)])
n = 2 * world * B
q = model.queue
assert int(q.filled) == n and int(q.ptr) == n, (int(q.filled), int(q.ptr))
torch.testing.assert_close(q.image[:n], want_img, rtol=0, atol=1e-6)
torch.testing.assert_close(q.text[:n], want_txt, rtol=0, atol=1e-6)
assert not torch.equal(want_img[:B], want_img[B:2 * B])  # the ranks did see different data
print(f"rank {rank} QUEUE OK", flush=True)
dist.destroy_process_group()
'''


def test_ddp_queue_holds_every_ranks_momentum_features(tmp_path):
    """Two gloo ranks with different data: after 2 steps each rank's queue holds the momentum
    features of both ranks, in step then rank order (ALBEF's all-gather before enqueue). Without
    the gather, DDP's buffer broadcast would leave every rank with rank 0's features only."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "ddp_queue_worker.py"
    script.write_text(_DDP_QUEUE_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script)]
    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("QUEUE OK") == 2, p.stdout[-2000:]
