"""Tests for bus.data: the synthetic captioned-shapes set, the tokenizers, CaptionFolder, collate."""
import io
import json
import pickle
import re
import warnings

import pytest
import torch

from bus.data import (
    COLORS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPECIAL_TOKENS,
    CaptionFolder,
    DataWarning,
    SyntheticShapes,
    boxes_to_patch_labels,
    build_tokenizer,
    collate,
    denormalize,
    make_loader,
    synthetic_tokenizer,
    synthetic_vocabulary,
)

N = 48  # items checked per property: enough to hit 1-, 2- and 3-mention captions


def _naive_patch_labels(boxes, image_size, patch_size):
    """Patch (r, c) is 1 iff its pixel square and some box share a positive area."""
    g = image_size // patch_size
    out = torch.zeros(g * g)
    for r in range(g):
        for c in range(g):
            px0, py0 = c * patch_size, r * patch_size
            for x0, y0, x1, y1 in boxes.tolist():
                dx = min(px0 + patch_size, x1) - max(px0, x0)
                dy = min(py0 + patch_size, y1) - max(py0, y0)
                if dx > 1e-3 and dy > 1e-3:
                    out[r * g + c] = 1
    return out


def _special_ids(tok):
    return [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id]


def _assert_items_equal(a, b):
    assert a.keys() == b.keys()
    assert torch.equal(a["image"], b["image"])
    assert torch.equal(a["patch_labels"], b["patch_labels"])
    assert torch.equal(a["boxes"], b["boxes"])
    assert a["caption"] == b["caption"] and a["image_id"] == b["image_id"]


# ---------------------------------------------------------------------------------- synthetic

def test_synthetic_deterministic_and_splits_disjoint():
    a = SyntheticShapes(N, seed=3)
    b = SyntheticShapes(N, seed=3)
    # Same (seed, split, i) -> same item, whatever the access order (pure function of the index).
    for i in [5, 0, N - 1, 5]:
        _assert_items_equal(a[i], b[i])
    _assert_items_equal(a[-1], a[N - 1])

    train = [a[i] for i in range(16)]
    train_images = {t["image"].numpy().tobytes() for t in train}
    for other in (SyntheticShapes(N, seed=3, split="val"), SyntheticShapes(N, seed=3, split="test"),
                  SyntheticShapes(N, seed=4)):
        items = [other[i] for i in range(16)]
        # No item of another stream repeats a train item (any index, not just the same one).
        assert not train_images & {x["image"].numpy().tobytes() for x in items}
        assert sum(x["caption"] == t["caption"] for x, t in zip(items, train)) < 4


def test_synthetic_shapes_dtypes_and_args():
    for image_size, patch_size in [(224, 16), (64, 8)]:
        ds = SyntheticShapes(4, image_size=image_size, patch_size=patch_size)
        p = (image_size // patch_size) ** 2
        assert ds.num_patches == p and len(ds) == 4
        it = ds[1]
        assert set(it) == {"image", "caption", "patch_labels", "boxes", "image_id"}
        assert it["image"].shape == (3, image_size, image_size) and it["image"].dtype == torch.float32
        assert it["patch_labels"].shape == (p,) and it["patch_labels"].dtype == torch.float32
        assert it["boxes"].dtype == torch.float32 and it["boxes"].ndim == 2 and it["boxes"].shape[1] == 4
        assert isinstance(it["caption"], str) and it["image_id"] == 1 and isinstance(it["image_id"], int)
        # Normalised: the dark background maps well below 0, bright objects above.
        assert it["image"].min() < -1.0 and it["image"].max() > 0.5
    with pytest.raises(IndexError):
        ds[4]
    for bad in [dict(image_size=100, patch_size=16), dict(split="dev"), dict(max_objects=0)]:
        with pytest.raises(ValueError):
            SyntheticShapes(4, **bad)


_PHRASE = r"an? (?:(small|large) )?(\w+) (\w+)"
_CAPTION_RE = re.compile(
    rf"^{_PHRASE}(?: ({'|'.join(RELATIONS)}) {_PHRASE}(?: and {_PHRASE})?)?$"
)


def _parse_caption(caption):
    m = _CAPTION_RE.match(caption)
    assert m, caption
    g = m.groups()
    phrases = [g[0:3]] + ([g[4:7]] if g[3] else []) + ([g[7:10]] if g[7] or g[8] else [])
    return [p for p in phrases if p[1] is not None], g[3]


def test_synthetic_captions_match_scene_and_patch_labels():
    ds = SyntheticShapes(N, seed=11)
    mention_counts = set()
    for i in range(N):
        item, scene = ds[i], ds.scene(i)
        assert scene.caption == item["caption"]
        objs = scene.objects
        assert 1 <= len(objs) <= ds.max_objects
        # (colour, shape) is unique in an image, so a caption phrase names exactly one object.
        assert len({(o.color, o.shape) for o in objs}) == len(objs)

        phrases, relation = _parse_caption(item["caption"])
        assert len(phrases) == len(scene.mentioned) >= 1
        mention_counts.add(len(phrases))
        if len(objs) >= 2:
            assert len(phrases) >= 2 and relation is not None
        for (size, color, shape), k in zip(phrases, scene.mentioned):
            obj = objs[k]
            assert (color, shape) == (obj.color, obj.shape)
            assert size is None or size == obj.size
        if relation is not None:
            (ax, ay), (bx, by) = objs[scene.mentioned[0]].center, objs[scene.mentioned[1]].center
            expect = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}
            assert expect.get(relation, True), (item["caption"], relation)

        # The named colours are really drawn: the box centre pixel is the object's colour
        # (within the per-object jitter and the background noise).
        pixels = denormalize(item["image"]) * 255
        for k in scene.mentioned:
            o = objs[k]
            cx, cy = int(o.center[0]), int(o.center[1])
            rgb = torch.tensor(COLORS[o.color], dtype=torch.float32)
            assert torch.allclose(pixels[:, cy, cx], rgb, atol=26)

        # Boxes are the mentioned objects' boxes, in caption order; labels cover exactly them.
        expected_boxes = torch.tensor([objs[k].box for k in scene.mentioned], dtype=torch.float32)
        assert torch.equal(item["boxes"], expected_boxes)
        labels = item["patch_labels"]
        assert labels.sum() >= 1
        assert torch.equal(labels, _naive_patch_labels(item["boxes"], ds.image_size, ds.patch_size))
    assert mention_counts == {1, 2, 3}


def test_synthetic_captions_discriminate():
    ds = SyntheticShapes(120, seed=5)
    captions = [ds.scene(i).caption for i in range(len(ds))]
    assert len(set(captions)) >= 0.9 * len(captions)
    used = {w for c in captions for w in c.split()}
    assert used <= set(synthetic_vocabulary())
    assert {*COLORS, *SHAPES, *SIZES} <= set(synthetic_vocabulary())


def test_boxes_to_patch_labels_edges():
    # A box edge on a patch border (also after float rounding) does not spill into the next patch.
    lab = boxes_to_patch_labels(torch.tensor([[0.0, 0.0, 16.0000001, 15.9999]]), 64, 16)
    assert lab.view(4, 4)[0].tolist() == [1, 0, 0, 0] and lab.sum() == 1
    lab = boxes_to_patch_labels(torch.tensor([[15.0, 30.0, 17.0, 34.0]]), 64, 16)
    assert torch.equal(lab, _naive_patch_labels(torch.tensor([[15.0, 30.0, 17.0, 34.0]]), 64, 16))
    assert boxes_to_patch_labels(torch.zeros(0, 4), 64, 16).sum() == 0


# ---------------------------------------------------------------------------------- tokenizers

def test_synthetic_tokenizer_round_trip():
    tok = synthetic_tokenizer()
    assert _special_ids(tok) == [0, 1, 2, 3, 4]
    assert tok.convert_ids_to_tokens(list(range(5))) == list(SPECIAL_TOKENS)
    assert tok.get_vocab() == synthetic_tokenizer().get_vocab()
    for w in synthetic_vocabulary():  # every caption word is one token
        assert tok.tokenize(w) == [w]
    ds = SyntheticShapes(N, seed=2)
    for i in range(N):
        cap = ds.scene(i).caption
        ids = tok(cap)["input_ids"]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == cap.lower()
    # Upper case is folded; pickling (DataLoader workers under spawn) keeps it working.
    tok2 = pickle.loads(pickle.dumps(tok))
    assert tok2("A Red CIRCLE")["input_ids"] == tok("a red circle")["input_ids"]


def test_build_tokenizer_deterministic_round_trip_and_bert():
    captions = [
        "A Dog running on the beach.",
        "Two dogs, one ball!",
        "a dog and a cat sleeping",
        "The cat sat on the mat.",
    ] * 3
    tok = build_tokenizer(captions, vocab_size=100)
    assert tok.get_vocab() == build_tokenizer(captions, vocab_size=100).get_vocab()
    assert len(tok) <= 100
    assert _special_ids(tok) == [0, 1, 2, 3, 4]
    assert tok.tokenize("dog") == ["dog"]
    for cap in captions + ["An unseen zebra, 42 times."]:
        ids = tok(cap)["input_ids"]
        assert tok.unk_token_id not in ids  # unseen words fall back to characters
        assert tok.decode(ids, skip_special_tokens=True) == cap.lower()
    with pytest.raises(ValueError):
        build_tokenizer(captions, vocab_size=10)

    # Ids fit a BertConfig built from the tokenizer (the model layer's text encoder config).
    from transformers import BertConfig

    cfg = BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    enc = tok(captions[:3], padding=True, return_tensors="pt")
    assert int(enc["input_ids"].max()) < cfg.vocab_size
    assert (enc["input_ids"][enc["attention_mask"] == 0] == cfg.pad_token_id).all()


# ---------------------------------------------------------------------------------- collate / loader

def test_collate_shapes_and_truncation():
    tok = synthetic_tokenizer()
    ds = SyntheticShapes(6, image_size=64, patch_size=8, seed=1)
    items = [ds[i] for i in range(6)]
    b = collate(items, tok)
    lengths = [len(tok(it["caption"])["input_ids"]) for it in items]
    L = max(lengths)
    assert b["images"].shape == (6, 3, 64, 64) and b["images"].dtype == torch.float32
    assert b["input_ids"].shape == (6, L) and b["input_ids"].dtype == torch.int64
    assert b["attention_mask"].shape == (6, L) and b["attention_mask"].dtype == torch.int64
    assert b["attention_mask"].sum(1).tolist() == lengths
    assert (b["input_ids"][:, 0] == tok.cls_token_id).all()
    assert (b["input_ids"][b["attention_mask"] == 0] == tok.pad_token_id).all()
    assert b["patch_labels"].shape == (6, 64) and b["patch_labels"].dtype == torch.float32
    assert b["image_id"].dtype == torch.int64 and b["image_id"].tolist() == list(range(6))
    assert b["captions"] == [it["caption"] for it in items] and len(b["boxes"]) == 6

    short = collate(items, tok, max_length=5)
    assert short["input_ids"].shape == (6, 5)
    assert (short["input_ids"][:, 0] == tok.cls_token_id).all()
    assert (short["input_ids"][:, -1] == tok.sep_token_id).all()  # every caption is > 3 tokens


def test_make_loader_seeded_and_distributed_sampler():
    from torch.utils.data import DistributedSampler

    tok = synthetic_tokenizer()
    ds = SyntheticShapes(10, image_size=32, patch_size=8, seed=0)

    def order(loader):
        return [i for b in loader for i in b["image_id"].tolist()]

    first = order(make_loader(ds, tok, batch_size=4, shuffle=True, seed=7))
    assert sorted(first) == list(range(10))
    assert first == order(make_loader(ds, tok, batch_size=4, shuffle=True, seed=7))
    assert first != order(make_loader(ds, tok, batch_size=4, shuffle=True, seed=8))
    assert order(make_loader(ds, tok, batch_size=4, shuffle=False)) == list(range(10))
    assert len(list(make_loader(ds, tok, batch_size=4, shuffle=False, drop_last=True))) == 2

    ranks = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        ranks.append(order(make_loader(ds, tok, batch_size=2, shuffle=False, sampler=sampler)))
    assert sorted(ranks[0] + ranks[1]) == list(range(10))
    with pytest.raises(ValueError, match="sampler"):
        make_loader(ds, tok, batch_size=2, shuffle=True, sampler=sampler)


# ---------------------------------------------------------------------------------- CaptionFolder

def _png_bytes(w, h, color, mode="RGB"):
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def caption_folder(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    (img / "a.png").write_bytes(_png_bytes(64, 32, (255, 0, 0)))
    (img / "b.png").write_bytes(_png_bytes(40, 40, 128, mode="L"))  # grayscale: converted to RGB
    (img / "corrupt.png").write_bytes(b"this is not an image" * 10)
    # Valid header (so it passes the construction check) but cut-off pixel data: fails to decode later.
    (img / "trunc.png").write_bytes(_png_bytes(300, 300, (1, 2, 3))[:90])
    meta = {
        "images": [
            {"id": 1, "file_name": "img/a.png", "width": 64, "height": 32},
            {"id": 2, "file_name": "img/b.png"},
            {"id": 3, "file_name": "img/missing.png"},
            {"id": 4, "file_name": "img/corrupt.png"},
            {"id": 5, "file_name": "img/trunc.png"},
            {"file_name": "img/no_id.png"},
        ],
        "annotations": [
            {"image_id": 1, "caption": "A red thing.", "boxes": [[0, 0, 32, 16]]},  # good, boxes
            {"image_id": 2, "caption": "a grey square"},  # good, no boxes
            {"image_id": 5, "caption": "a truncated image"},  # passes construction
            {"image_id": 1, "caption": "   "},  # empty caption
            {"image_id": 3, "caption": "missing file"},
            {"image_id": 4, "caption": "corrupt bytes"},
            {"image_id": 99, "caption": "unknown image"},
            {"image_id": 1, "caption": "inverted box", "boxes": [[30, 10, 20, 5]]},
            {"image_id": 1, "caption": "box outside", "boxes": [[0, 0, 640, 16]]},
            {"image_id": 2},  # no caption
        ],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(meta))
    return tmp_path, path


def test_caption_folder_skips_and_reports_bad_records(caption_folder):
    root, path = caption_folder
    with pytest.warns(DataWarning, match=r"skipped 7 of 10 annotations") as rec:
        ds = CaptionFolder(str(root), str(path), image_size=64, patch_size=16)
    assert len(rec) == 1  # one report, not one warning per record
    assert len(ds) == 3 and len(ds.skipped) == 7
    reasons = " ".join(r for _, r in ds.skipped)
    for needle in ["empty caption", "file not found", "unreadable", "unknown image_id 99", "bad box"]:
        assert needle in reasons

    a = ds[0]
    assert a["image"].shape == (3, 64, 64) and a["image"].dtype == torch.float32
    assert a["caption"] == "A red thing." and a["image_id"] == 1
    # 64x32 -> 64x64: x unchanged, y doubled.
    assert torch.allclose(a["boxes"], torch.tensor([[0.0, 0.0, 32.0, 32.0]]))
    assert a["patch_labels"].view(4, 4)[:2, :2].eq(1).all() and a["patch_labels"].sum() == 4
    assert torch.allclose(denormalize(a["image"])[:, 10, 10], torch.tensor([1.0, 0.0, 0.0]), atol=1e-2)

    b = ds[1]
    assert b["image_id"] == 2 and b["boxes"].shape == (0, 4)
    assert (b["patch_labels"] == -1).all()  # unknown: ignored by the PTM loss

    # The truncated file is replaced by the next loadable item (wrapping round), with a warning.
    with pytest.warns(DataWarning, match="could not decode"):
        c = ds[2]
    assert c["image_id"] == 1 and c["caption"] == "A red thing."
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second decode attempt, no second warning
        assert ds[2]["image_id"] == 1

    tok = build_tokenizer(r["caption"] for r in ds.records)
    batch = next(iter(make_loader(ds, tok, batch_size=3, shuffle=False)))
    assert batch["images"].shape == (3, 3, 64, 64) and batch["patch_labels"].shape == (3, 16)


def test_caption_folder_all_bad_raises(tmp_path):
    meta = {"images": [], "annotations": [{"image_id": 1, "caption": "x"}]}
    (tmp_path / "c.json").write_text(json.dumps(meta))
    with pytest.warns(DataWarning), pytest.raises(ValueError, match="no valid"):
        CaptionFolder(str(tmp_path), str(tmp_path / "c.json"))
    (tmp_path / "bad.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="images"):
        CaptionFolder(str(tmp_path), str(tmp_path / "bad.json"))
