"""PIE-Bench network metrics on tiny random-weight networks saved to local folders (no download)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import npinv.bench.netmetrics as nm
from npinv.bench.netmetrics import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LPIPSSqueeze,
    NetworkMetrics,
    clip_pixels,
    clip_score,
    keys_self_similarity,
    lpips_state_keys,
    squeezenet1_1_features,
    structure_pixels,
)
from npinv.vocab import write_tokenizer

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "circle", "square", "on", "background", "the"]


# -- tiny networks -------------------------------------------------------------------------------
def build_dino(folder: Path, image_size: int = 224) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                    image_size=image_size, patch_size=8)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    return folder


def build_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    write_tokenizer(folder, WORDS, max_length=77)
    tok = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(1)
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8)
    CLIPModel(cfg).save_pretrained(folder)
    return folder


def lpips_state(seed: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = LPIPSSqueeze().state_dict()
    return {k: (v.abs() if k.startswith("lin") else v).contiguous() for k, v in state.items()}  # heads >= 0, as trained


def build_lpips(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file(lpips_state(), str(path))
    return path


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("netmetrics")
    return {"structure": build_dino(root / "dino"), "clip": build_clip(root / "clip"),
            "lpips": build_lpips(root / "lpips.safetensors")}


@pytest.fixture(scope="module")
def metrics(nets) -> NetworkMetrics:
    return NetworkMetrics.load(structure=nets["structure"], lpips=nets["lpips"], clip=nets["clip"], device="cpu")


def _images(size: int = 32):
    rng = np.random.default_rng(0)
    a = np.round(rng.random((size, size, 3)) * 255) / 255
    b = np.round(rng.random((size, size, 3)) * 255) / 255
    mask = np.zeros((size, size), bool)
    mask[8:24, 8:24] = True
    return a, b, mask


# -- loading ----------------------------------------------------------------------------------------
def test_loads_from_local_paths_offline(metrics, nets):
    assert metrics.missing == {} and metrics.unavailable == [] and metrics.note() is None
    a, b, mask = _images()
    out = metrics.compute(a, b, mask, "a photo of a dog")
    assert set(out) == {"structure", "lpips", "clip_whole", "clip_edited"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert out["structure"] > 0 and out["lpips"] > 0 and 0 <= out["clip_whole"] <= 100


def test_missing_networks_are_unavailable_with_one_line(tmp_path, nets, monkeypatch):
    monkeypatch.delenv(nm.LPIPS_ENV, raising=False)
    m = NetworkMetrics.load(structure=tmp_path / "no-dino", lpips=None, clip=tmp_path / "no-clip", device="cpu")
    assert m.unavailable == ["structure", "lpips", "clip"]
    assert "no-dino: no such file or folder" in m.missing["structure"]
    assert nm.LPIPS_ENV in m.missing["lpips"]
    note = m.note()
    assert note.count("\n") == 0 and "structure distance (DINO ViT-B/8)" in note and "CLIP score" in note
    a, b, mask = _images()
    assert m.compute(a, b, mask, "a cat") == dict.fromkeys(["structure", "lpips", "clip_whole", "clip_edited"])

    # A hub id that is not in the (offline) cache: reported, not downloaded.
    m = NetworkMetrics.load(structure="npinv-test/not-a-model", lpips=False, clip=False, device="cpu")
    assert "npinv-test/not-a-model is not in the Hugging Face cache" in m.missing["structure"]
    assert m.missing["lpips"] == m.missing["clip"] == "not requested"

    # Only what is missing is named; the LPIPS file may come from the environment.
    monkeypatch.setenv(nm.LPIPS_ENV, str(nets["lpips"]))
    m = NetworkMetrics.load(structure=nets["structure"], clip=tmp_path / "no-clip", device="cpu")
    assert m.unavailable == ["clip"] and m.lpips is not None and m.dino is not None
    assert "structure" not in m.note() and "lpips" not in m.note().lower()
    out = m.compute(a, b, mask, "a cat")
    assert out["clip_whole"] is None and out["clip_edited"] is None and out["lpips"] > 0


def test_not_a_vit_or_broken_folder_is_unavailable(tmp_path, nets):
    m = NetworkMetrics.load(structure=nets["clip"], lpips=False, clip=tmp_path, device="cpu")
    assert "structure" in m.missing and "clip" in m.missing
    assert all("\n" not in why for why in m.missing.values())


def test_lpips_weights_files(tmp_path):
    from safetensors.torch import save_file

    # Pickled weights only with the explicit flag.
    state = lpips_state()
    torch.save(state, tmp_path / "w.pth")
    m = NetworkMetrics.load(structure=False, lpips=tmp_path / "w.pth", clip=False, device="cpu")
    assert "allow_pickle=True" in m.missing["lpips"]
    m = NetworkMetrics.load(structure=False, lpips=tmp_path / "w.pth", clip=False, device="cpu", allow_pickle=True)
    assert m.lpips is not None

    # lpips' own names (net.sliceN.i..., linK.model.1.weight), split over two files as distributed.
    backbone = {f"net.slice1.{k[len('features.'):]}": v for k, v in state.items() if k.startswith("features.")}
    heads = {f"{k.split('.')[0]}.model.1.weight": v for k, v in state.items() if k.startswith("lin")}
    heads["scaling_layer.shift"] = torch.tensor(nm.LPIPS_SHIFT)[None, :, None, None]
    save_file(backbone, str(tmp_path / "backbone.safetensors"))
    save_file(heads, str(tmp_path / "heads.safetensors"))
    both = [tmp_path / "backbone.safetensors", tmp_path / "heads.safetensors"]
    m2 = NetworkMetrics.load(structure=False, lpips=both, clip=False, device="cpu")
    a, b, mask = _images()
    assert m2.lpips_distance(a, b, mask) == pytest.approx(m.lpips_distance(a, b, mask), rel=1e-6)

    # Incomplete or foreign files.
    m3 = NetworkMetrics.load(structure=False, lpips=both[1], clip=False, device="cpu")
    assert "lack(s) 50 of the 57 LPIPS weights (e.g. features.0.weight)" in m3.missing["lpips"]
    save_file({"conv.weight": torch.zeros(1)}, str(tmp_path / "odd.safetensors"))
    m4 = NetworkMetrics.load(structure=False, lpips=tmp_path / "odd.safetensors", clip=False, device="cpu")
    assert "not SqueezeNet 1.1 / LPIPS weights (e.g. 'conv.weight')" in m4.missing["lpips"]
    bad = dict(state)
    bad["lin0.weight"] = torch.zeros(1, 3, 1, 1)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    m5 = NetworkMetrics.load(structure=False, lpips=tmp_path / "bad.safetensors", clip=False, device="cpu")
    assert "do not fit SqueezeNet 1.1" in m5.missing["lpips"] and "\n" not in m5.missing["lpips"]
    m6 = NetworkMetrics.load(structure=False, lpips=tmp_path / "nothing.safetensors", clip=False, device="cpu")
    assert "LPIPS weights file not found" in m6.missing["lpips"]


# -- structure distance -------------------------------------------------------------------------------
def test_structure_distance_zero_for_itself_and_symmetric(metrics):
    a, b, _ = _images()
    for parity in (False, True):
        assert metrics.structure_distance(a, a, parity) == 0.0
        ab, ba = metrics.structure_distance(a, b, parity), metrics.structure_distance(b, a, parity)
        assert ab > 0 and ab == pytest.approx(ba, rel=1e-6)
    assert metrics.structure_distance(a, b, True) != pytest.approx(metrics.structure_distance(a, b, False))


def test_keys_are_the_last_blocks_key_projection(metrics):
    vit = metrics.dino
    a, _, _ = _images()
    pixels = structure_pixels(a)
    sim = keys_self_similarity(vit, pixels)
    tokens = 1 + (224 // 8) ** 2  # CLS + 28 x 28 patches
    assert sim.shape == (1, tokens, tokens)
    with torch.no_grad():
        hidden = vit(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]  # input to the last block
        last = vit.layers[-1] if hasattr(vit, "layers") else vit.encoder.layer[-1]
        keys = nm.last_key_projection(vit)(last.layernorm_before(hidden))
    unit = F.normalize(keys, dim=-1)
    torch.testing.assert_close(sim, unit @ unit.transpose(1, 2), rtol=1e-4, atol=1e-5)
    assert torch.diagonal(sim[0]).sub(1).abs().max() < 1e-5


def test_structure_preprocessing_shapes_ranges_and_parity():
    ones = np.ones((512, 512, 3))
    x = structure_pixels(ones)
    assert x.shape == (1, 3, 224, 224)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 100, 100], (1 - mean) / std)
    torch.testing.assert_close(structure_pixels(ones, parity=True)[0, :, 100, 100], (255 - mean) / std)
    rng = np.random.default_rng(3)
    img = rng.random((64, 64, 3))
    raw = structure_pixels(img) * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    par = structure_pixels(img, parity=True) * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    torch.testing.assert_close(par, raw * 255, rtol=1e-5, atol=1e-3)
    assert structure_pixels(np.zeros((512, 1024, 3))).shape == (1, 3, 224, 448)
    assert structure_pixels(np.zeros((100, 400, 3))).shape == (1, 3, 120, 480)  # long side capped at 480


# -- LPIPS ------------------------------------------------------------------------------------------
def test_squeezenet_keys_are_torchvisions():
    expected = ["features.0.weight", "features.0.bias"]
    for i in (3, 4, 6, 7, 9, 10, 11, 12):
        for part in ("squeeze", "expand1x1", "expand3x3"):
            expected += [f"features.{i}.{part}.weight", f"features.{i}.{part}.bias"]
    assert list(squeezenet1_1_features().state_dict()) == [k[len("features."):] for k in expected]
    assert lpips_state_keys() == expected + [f"lin{i}.weight" for i in range(7)]
    shapes = {k: tuple(v.shape) for k, v in LPIPSSqueeze().state_dict().items()}
    assert shapes["features.0.weight"] == (64, 3, 3, 3) and shapes["features.12.expand3x3.weight"] == (256, 64, 3, 3)
    assert [shapes[f"lin{i}.weight"] for i in range(7)] == [(1, c, 1, 1) for c in nm.LPIPS_CHANNELS]
    feats = LPIPSSqueeze().layer_features(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == list(nm.LPIPS_CHANNELS)


def test_lpips_zero_for_identical_positive_otherwise(metrics):
    a, b, mask = _images()
    for parity in (False, True):
        assert metrics.lpips_distance(a, a, mask, parity) == 0.0
        assert metrics.lpips_distance(a, b, mask, parity) > 0
    # Differences only inside the edited region do not count: both images are masked first.
    c = a.copy()
    c[mask] = b[mask]
    assert metrics.lpips_distance(a, c, mask) == 0.0
    assert math.isnan(metrics.lpips_distance(a, b, np.ones((32, 32), bool)))
    # With no mask the two conventions agree (a plain spatial average).
    none = np.zeros((32, 32), bool)
    assert metrics.lpips_distance(a, b, none) == pytest.approx(metrics.lpips_distance(a, b, none, True), rel=1e-6)


def test_lpips_matches_a_hand_computation(metrics):
    net = metrics.lpips
    a, b, _ = _images()
    x0 = torch.from_numpy(a).float().permute(2, 0, 1)[None] * 2 - 1
    x1 = torch.from_numpy(b).float().permute(2, 0, 1)[None] * 2 - 1
    shift = torch.tensor(nm.LPIPS_SHIFT).view(1, 3, 1, 1)
    scale = torch.tensor(nm.LPIPS_SCALE).view(1, 3, 1, 1)
    with torch.no_grad():
        h0, h1, total = (x0 - shift) / scale, (x1 - shift) / scale, 0.0
        k = 0
        for i, layer in enumerate(net.features):
            h0, h1 = layer(h0), layer(h1)
            if i in (1, 4, 7, 9, 10, 11, 12):
                n0 = h0 / (h0.norm(dim=1, keepdim=True) + 1e-10)
                n1 = h1 / (h1.norm(dim=1, keepdim=True) + 1e-10)
                total += float((((n0 - n1) ** 2) * getattr(net, f"lin{k}").weight.view(1, -1, 1, 1)).sum(1).mean())
                k += 1
    assert metrics.lpips_distance(a, b, np.zeros((32, 32), bool), True) == pytest.approx(total, rel=1e-5)


# -- CLIP ---------------------------------------------------------------------------------------------
def test_clip_score_formula():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    txt = torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(clip_score(img, txt), torch.tensor([100 / math.sqrt(2), 100 / math.sqrt(2), 0.0]))


def test_clip_scores_are_100_cos_of_the_models_embeddings(metrics):
    _, b, mask = _images()
    whole, edited = metrics.clip_scores(b, mask, "a photo of a dog")
    img255 = np.rint(b * 255)
    with torch.no_grad():
        pixels = torch.cat([clip_pixels(img255, 32), clip_pixels(img255 * mask[..., None], 32)])
        emb = nm._embedding(metrics.clip.get_image_features(pixel_values=pixels))
        tok = metrics.clip_tokenizer(["a photo of a dog"], return_tensors="pt")
        txt = nm._embedding(metrics.clip.get_text_features(**tok))[0]
    cos = [float(e @ txt / (e.norm() * txt.norm())) for e in emb]
    assert whole == pytest.approx(100 * max(cos[0], 0), rel=1e-4, abs=1e-4)
    assert edited == pytest.approx(100 * max(cos[1], 0), rel=1e-4, abs=1e-4)
    assert whole != pytest.approx(edited)
    assert math.isnan(metrics.clip_scores(b, np.zeros((32, 32), bool), "a dog")[1])


def test_clip_scores_use_the_embeddings(metrics, monkeypatch):
    monkeypatch.setattr(metrics, "image_embeddings", lambda images: torch.tensor([[3.0, 4.0], [0.0, -1.0]]))
    monkeypatch.setattr(metrics, "text_embedding", lambda prompt: torch.tensor([[4.0, 3.0]]))
    _, b, mask = _images()
    whole, edited = metrics.clip_scores(b, mask, "a dog")
    assert whole == pytest.approx(100 * 24 / 25) and edited == 0.0


def test_clip_preprocessing_shapes_and_ranges():
    x = clip_pixels(np.full((512, 512, 3), 255.0), 224)
    assert x.shape == (1, 3, 224, 224)
    torch.testing.assert_close(x[0, :, 5, 5], (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))
    wide = np.zeros((100, 300, 3))
    wide[:, 150:] = 255.0
    y = clip_pixels(wide, 50)  # resized to 50 x 150, then the centre 50 x 50: left half dark, right half bright
    assert y.shape == (1, 3, 50, 50)
    low = (0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(y[0, :, 10, 5], low)
    torch.testing.assert_close(y[0, :, 10, 45], (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))
    pix = clip_pixels(np.random.default_rng(0).random((40, 40, 3)) * 255, 32)
    back = pix * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    assert torch.allclose(back * 255, (back * 255).round(), atol=1e-3)  # 8-bit after the resize, like PIL


def test_old_style_dino_checkpoint_loads_and_partial_ones_do_not(tmp_path, nets):
    """The hub's facebook/dino-vitb8 uses the pre-5.x names (encoder.layer.N.attention.attention.key...)."""
    import json

    from safetensors.torch import load_file, save_file

    state = load_file(str(nets["structure"] / "model.safetensors"))
    renames = [("layers.", "encoder.layer."), ("attention.q_proj", "attention.attention.query"),
               ("attention.k_proj", "attention.attention.key"), ("attention.v_proj", "attention.attention.value"),
               ("attention.o_proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")]
    old = {}
    for key, value in state.items():
        for a, b in renames:
            key = key.replace(a, b)
        old[key] = value
    assert "encoder.layer.1.attention.attention.key.weight" in old
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text((nets["structure"] / "config.json").read_text())
    save_file(old, str(folder / "model.safetensors"))
    m = NetworkMetrics.load(structure=folder, lpips=False, clip=False, device="cpu")
    assert m.dino is not None, m.missing
    ref = NetworkMetrics.load(structure=nets["structure"], lpips=False, clip=False, device="cpu")
    a, b, _ = _images()
    assert m.structure_distance(a, b) == pytest.approx(ref.structure_distance(a, b), rel=1e-6)

    # A checkpoint without the last block's keys would leave them random: unavailable, not faked.
    del old["encoder.layer.1.attention.attention.key.weight"]
    save_file(old, str(folder / "model.safetensors"))
    m = NetworkMetrics.load(structure=folder, lpips=False, clip=False, device="cpu")
    assert "lacks 1 weight(s) of ViTModel" in m.missing["structure"]
    assert json.loads((folder / "config.json").read_text())["patch_size"] == 8
