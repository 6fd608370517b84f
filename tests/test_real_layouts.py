"""npinv on models shaped like the real Stable Diffusion 1.5 and SDXL: their block layouts, the real
CLIP tokenizer, 512 px and 1024 px default resolutions, attention maps from 64x64 down to 8x8, and
non-square images (tiny widths, random weights: shapes and bookkeeping are checked, not pixels).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from npinv.cli import main

STEPS = 3
HIPPO = "a photo of a hippopotamus on the grass"
RHINO = "a photo of a rhinoceros on the grass"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--quiet", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return code, out, err


def npi_cost(steps: int, targets: int) -> tuple[int, int]:
    """(UNet calls, UNet rows) of a DDIM inversion plus an NPI edit: one row a step to invert,
    then the source's conditional row (its negative is itself) and each target's two rows."""
    return 2 * steps, steps + steps * (1 + 2 * targets)


def photo(tmp_path: Path, name: str, size: tuple[int, int] | None = None) -> Path:
    """A scikit-image sample photograph (shipped in its wheel) as a PNG, optionally resized."""
    from skimage import data

    img = Image.fromarray(getattr(data, name)())
    if name == "coffee":  # 600x400 -> 532x400, 4:3, so that --resize fit gives 512x384 (1024x768)
        img = img.crop((34, 0, 566, 400))
    if size is not None:
        img = img.resize(size, Image.Resampling.LANCZOS)
    path = tmp_path / f"{name}.png"
    img.save(path)
    return path


@pytest.fixture(scope="module")
def clip():
    from clip_tokenizer import load

    return load()


@pytest.fixture(scope="module")
def sd15(sd15_layout_folder):
    from npinv import load_model

    return load_model(str(sd15_layout_folder), device="cpu")


# -- the tokenizer ------------------------------------------------------------------------------------------------


def test_real_clip_tokenizer(clip, sd15, sdxl_layout_folder):
    assert clip("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(clip) == 49408 and clip.model_max_length == 77
    assert clip.pad_token_id == 49407  # SD 1.x pads with EOS
    # The words the edits below swap are several BPE tokens each, the case toy vocabularies never have.
    for word in ("hippopotamus", "rhinoceros"):
        assert len(clip.tokenize(word)) == 3
    assert len(clip.tokenize("dog")) == 1
    # The saved SD 1.5-layout model carries the same tokenizer, and a text encoder sized for it.
    tok = sd15.pipe.tokenizer
    assert tok(HIPPO).input_ids == clip(HIPPO).input_ids and len(tok) == 49408
    enc = sd15.pipe.text_encoder.config
    assert enc.vocab_size == 49408 and enc.max_position_embeddings == 77
    assert sd15.encode_prompt(HIPPO).hidden.shape == (1, 77, sd15.unet.config.cross_attention_dim)
    # SDXL's second tokenizer pads with "!" (id 0), the first with EOS.
    index = json.loads((sdxl_layout_folder / "model_index.json").read_text())
    assert index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    from transformers import CLIPTokenizer

    tok2 = CLIPTokenizer.from_pretrained(sdxl_layout_folder / "tokenizer_2")
    assert tok2.pad_token_id == 0 and len(tok2) == 49408
    assert tok2("a cat", padding="max_length").input_ids[:5] == [49406, 320, 2368, 49407, 0]


# -- layer layout ---------------------------------------------------------------------------------------------------


def map_sides(unet, latent: int, cross: bool) -> Counter:
    from npinv.attention.processor import layer_infos

    return Counter(latent // i.downscale for i in layer_infos(unet).values() if i.is_cross == cross)


def test_sd15_layout_attention_maps_at_512(sd15):
    cfg = sd15.unet.config
    assert cfg.down_block_types == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert cfg.up_block_types == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert cfg.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert sd15.resolution == 512 and sd15.vae_scale_factor == 8
    # SD 1.5: 16 cross-attention layers: two a down level, three an up level, one in the mid block.
    assert map_sides(sd15.unet, 64, cross=True) == {64: 5, 32: 5, 16: 5, 8: 1}
    assert map_sides(sd15.unet, 64, cross=False) == {64: 5, 32: 5, 16: 5, 8: 1}


@pytest.mark.parametrize("hw", [(512, 512), (384, 512)])
def test_layer_infos_match_the_real_query_counts(sd15, hw):
    """What layer_infos says (latent / downscale) is what the UNet computes, layer by layer."""
    from npinv.attention.processor import controlled_attention

    seen = {}

    class Record:
        def attention(self, probs, layer):
            seen[layer.name] = probs.shape[2]
            return probs

    lh, lw = hw[0] // 8, hw[1] // 8
    with controlled_attention(sd15.unet, Record(), self_min_downscale=1) as hooked:
        sd15.unet_output(torch.zeros(1, 4, lh, lw), 500, sd15.encode_prompt(HIPPO))
    assert len(seen) == len(hooked) == 32
    for info in hooked.values():
        assert seen[info.name] == (lh // info.downscale) * (lw // info.downscale), info


def test_sdxl_layout_attention_maps_at_1024(sdxl_layout_folder):
    from npinv import load_model

    model = load_model(str(sdxl_layout_folder), device="cpu")
    assert model.is_sdxl and model.resolution == 1024
    cfg = model.unet.config
    assert cfg.down_block_types == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert cfg.up_block_types == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert cfg.addition_embed_type == "text_time"
    # No attention at 128x128; 64x64 at the second level, 32x32 (two transformer layers a block) at the third and mid.
    assert map_sides(model.unet, 128, cross=True) == {64: 5, 32: 12}
    emb = model.encode_prompt(HIPPO)
    assert emb.hidden.shape == (1, 77, cfg.cross_attention_dim) and emb.pooled.shape == (1, 32)


# -- CLI edits at the real resolutions ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["square", "fit"])
def test_sd15_layout_cli_edit_512(capsys, tmp_path, sd15_layout_folder, clip, case):
    if case == "square":  # a 512x512 photograph, two targets
        image, extra, size = photo(tmp_path, "astronaut"), [], (512, 512)
        targets = [RHINO, "a photo of a rhinoceros in the snow"]
        blend = ("hippopotamus", "rhinoceros")
    else:  # a 532x400 photograph fitted to 512x384; a 3-token word swapped for a 1-token one
        image, extra, size = photo(tmp_path, "coffee"), ["--resize", "fit"], (512, 384)
        targets = ["a photo of a dog on the grass"]
        blend = ("hippopotamus", "dog")
    assert len(clip.tokenize(blend[0])) != 1
    out = tmp_path / "edit.png"
    code, stdout, err = run(capsys, "edit", image, "--source", HIPPO, *[a for t in targets for a in ("--target", t)],
                            "--controller", "replace", "--blend", *blend, "--steps", STEPS, "--model",
                            sd15_layout_folder, "--out", out, *extra, "--json")
    assert code == 0, err
    row = json.loads(stdout)
    calls, rows = npi_cost(STEPS, len(targets))
    assert (row["unet_calls"], row["unet_rows"]) == (calls, rows)
    assert row["steps"] == STEPS and row["controller"] == "replace" and row["targets"] == targets
    assert len(row["outputs"]) == len(targets)
    for path in row["outputs"]:
        with Image.open(path) as img:
            assert img.size == size
    with Image.open(row["grid"]) as grid:
        # input | reconstruction | edits, 2 px apart
        assert grid.size == ((2 + len(targets)) * (size[0] + 2) + 2, size[1] + 4)


def test_sdxl_layout_cli_edit_1024x768(capsys, tmp_path, sdxl_layout_folder):
    image = photo(tmp_path, "coffee")  # 532x400: fitted to the model's 1024 px, 1024x768
    out = tmp_path / "edit.png"
    target = "a watercolor photo of a rhinoceros on the grass"  # one more word: refine
    code, stdout, err = run(capsys, "edit", image, "--source", HIPPO, "--target", target, "--controller", "refine",
                            "--blend", "hippopotamus", "rhinoceros", "--steps", STEPS, "--model", sdxl_layout_folder,
                            "--resize", "fit", "--out", out, "--json")
    assert code == 0, err
    row = json.loads(stdout)
    assert (row["unet_calls"], row["unet_rows"]) == npi_cost(STEPS, 1)
    with Image.open(out) as img:
        assert img.size == (1024, 768)


# -- which layers each Prompt-to-Prompt rule reads ------------------------------------------------------------------


@pytest.mark.parametrize("hw, self_sizes, blend_size", [
    ((512, 512), {(32, 32), (16, 16), (8, 8)}, (16, 16)),
    ((384, 512), {(24, 32), (12, 16), (6, 8)}, (12, 16)),
])
def test_rules_touch_the_reference_map_sizes(sd15, hw, self_sizes, blend_size):
    """As the reference at 512 px: self-attention replaced at 32x32 and below, cross-attention edited
    at every size, local blend read from the 16x16 maps (for a 64x64 latent; proportionally otherwise).
    Sizes are (map_h, map_w); a 512x384 (w x h) image has a 48x64 latent."""
    from npinv import ddim_inversion
    from npinv.editing import EditSettings, edit

    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, *hw, generator=g) * 2 - 1
    inv = ddim_inversion(sd15, image, HIPPO, steps=STEPS)
    result = edit(sd15, inv, [RHINO], EditSettings(controller="replace", blend=("hippopotamus", "rhinoceros")))
    lh, lw = hw[0] // 8, hw[1] // 8
    seen = result.controller.seen
    assert seen["self_replaced"] == self_sizes
    assert seen["cross_edited"] == {(lh // d, lw // d) for d in (1, 2, 4, 8)}
    assert seen["blend_read"] == {blend_size}
    assert result.images.shape == (1, 3, *hw)
    assert tuple(result.blend_mask.shape[-2:]) == (lh, lw)


# -- latents whose sides are not multiples of the UNet's 8x downsampling --------------------------------------------


def test_blend_on_a_latent_side_not_divisible_by_8(sd15):
    """A 3:2 photo fitted to 512 px is 512x344 (multiples of 8, as SD pipelines accept): latent 64x43.
    diffusers' UNet runs on it (it passes the skip connections' sizes to its upsamplers), and so does
    an edit without blend; the local blend's 16x11 map must then be read as 16x11, not 16x10."""
    from npinv import ddim_inversion
    from npinv.editing import EditSettings, edit

    image = torch.zeros(1, 3, 344, 512)
    inv = ddim_inversion(sd15, image, HIPPO, steps=2)
    plain = edit(sd15, inv, [RHINO], EditSettings(controller="replace"))
    assert plain.images.shape == (1, 3, 344, 512)
    result = edit(sd15, inv, [RHINO], EditSettings(controller="replace", blend=("hippopotamus", "rhinoceros")))
    assert np.isfinite(result.images.numpy()).all()
    assert result.controller.seen["blend_read"] == {(11, 16)}
    assert result.controller.seen["cross_edited"] == {(43, 64), (22, 32), (11, 16), (6, 8)}
