"""train-scenes: reproducible, resumable, refuses to mix runs; the grounding loss rewards the right maps."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from npinv import training
from npinv.cli import main
from npinv.scenes import COLORS, SHAPES, balanced_scenes
from npinv.training import _word_positions, build_components, grounding_losses

TINY = {
    "name": "tiny", "seed": 3, "resolution": 64, "train_scenes": 96, "captions": "balanced",
    "text": {"hidden_size": 32, "intermediate_size": 64, "layers": 1, "heads": 2, "max_length": 32},
    "vae": {"block_out_channels": [16, 32, 32], "latent_channels": 4, "steps": 2, "batch_size": 2, "crop": 32,
            "lr": 0.001, "kl_weight": 1e-06},
    "unet": {"block_out_channels": [32, 32, 32], "layers_per_block": 1, "attention_head_dim": 8, "steps": 4,
             "batch_size": 4, "lr": 0.0003, "warmup": 2, "caption_dropout": 0.25, "ema_decay": 0.999,
             "grounding": {"token_weight": 0.1, "pixel_weight": 0.1}},
    "checkpoint_every": 2,
}


def _config(tmp_path: Path, **changes) -> Path:
    cfg = json.loads(json.dumps(TINY)) | changes
    path = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*.json')))}.json"
    path.write_text(json.dumps(cfg))
    return path


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("unet", "text_encoder", "vae"):
        for f in (folder / part).glob("*.safetensors"):
            out |= {f"{part}.{k}": v for k, v in load_file(f).items()}
    return out


def test_resumed_run_gives_the_uninterrupted_weights(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    assert main(["train-scenes", "--config", str(cfg), "--out", str(tmp_path / "whole")]) == 0

    # Crash right after the UNet's first checkpoint (step 2 of 4), then resume.
    real_save = training._save_ckpt

    def save_then_crash(path, **state):
        real_save(path, **state)
        if path.name == "unet.ckpt":
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "_save_ckpt", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        training.train_scenes(cfg, tmp_path / "split")
    monkeypatch.setattr(training, "_save_ckpt", real_save)
    assert not (tmp_path / "split").exists()
    assert torch.load(tmp_path / "split.run" / "unet.ckpt", weights_only=False)["step"] == 2
    assert main(["train-scenes", "--config", str(cfg), "--out", str(tmp_path / "split"), "--resume"]) == 0

    whole, split = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert whole.keys() == split.keys() and len(whole) > 100
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    log = [json.loads(x) for x in (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()]
    assert any(r.get("token") is not None for r in log if r["stage"] == "unet")  # the grounding loss ran


def test_a_started_run_is_resumed_only_when_asked_and_with_its_config(tmp_path, capsys):
    cfg = _config(tmp_path)
    out = tmp_path / "m"
    assert main(["train-scenes", "--config", str(cfg), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train-scenes", "--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--resume" in err and "\n" not in err
    other = _config(tmp_path, seed=4)
    assert main(["train-scenes", "--config", str(other), "--out", str(out), "--resume"]) == 2
    assert "another config" in capsys.readouterr().err


def test_balanced_scenes_cycle_through_every_triple():
    scenes = list(balanced_scenes(7, 180))
    counts = Counter((s.shape, s.color, s.background) for s in scenes)
    assert len(counts) == len(SHAPES) * len(COLORS) * (len(COLORS) - 1) == 90
    assert set(counts.values()) == {2}


def test_word_positions_find_the_caption_words(tmp_path):
    tok = build_components(TINY, tmp_path / "tok")["tokenizer"]
    scenes = list(balanced_scenes(1, 5))
    ids = tok([s.caption for s in scenes], padding="max_length", max_length=32, return_tensors="pt").input_ids
    pos = _word_positions(tok, ids, [(s.color, s.shape, s.background) for s in scenes])
    for row, s, p in zip(ids, scenes, pos, strict=True):
        words = [tok.convert_ids_to_tokens(int(row[int(i)])).removesuffix("</w>") for i in p]
        assert words == [s.color, s.shape, s.background, "background"]


def test_grounding_loss_prefers_maps_on_their_regions():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1:3, 1:3] = 1.0
    inside = mask.flatten()
    positions = torch.tensor([[1, 2, 3, 4]])

    def probs(object_map: torch.Tensor) -> torch.Tensor:
        p = torch.full((1, 2, 16, 6), 0.05)
        p[..., 1] = p[..., 2] = 0.4 * object_map
        p[..., 3] = p[..., 4] = 0.4 * (1 - object_map)
        return p / p.sum(-1, keepdim=True)

    right = grounding_losses([probs(inside)], mask, positions)
    wrong = grounding_losses([probs(1 - inside)], mask, positions)
    flat = grounding_losses([probs(torch.full((16,), 0.5))], mask, positions)
    assert right[0] < flat[0] < wrong[0] and right[1] < flat[1] < wrong[1]
    logits = torch.zeros(1, 2, 16, 6, requires_grad=True)
    sum(grounding_losses([logits.softmax(-1)], mask, positions)).backward()
    assert logits.grad.abs().sum() > 0


def test_model_card_measures_a_trained_model_against_every_target(tmp_path):
    from npinv import modelcard

    out = tmp_path / "m"
    out.mkdir()
    (out / modelcard.HISTORY_FILE).write_text("## History\n\n### v0\n- older figures\n")
    training.train_scenes(_config(tmp_path), out)  # replaces the folder; the history stays
    assert modelcard.main(["--model", str(out), "--n-vae", "2", "--n-captions", "2", "--n-recon", "1", "--steps", "2,3",
                           "--sample-steps", "2", "--n-edit", "1", "--edit-steps", "3", "--n-iou", "2",
                           "--iou-steps", "3"]) == 0
    figures = json.loads((out / "model_card_figures.json").read_text())
    loc = figures["localisation"]
    assert loc["n"] == 2 and loc["maps"] == "16x16" and 0 <= loc["object_iou"] <= 1 and 0 <= loc["background_iou"] <= 1
    assert {r["blend_maps"] for r in figures["edit_sweep"]["rows"]} == {"16x16"}
    assert {r["blend_maps"] for r in figures["edit_sweep_noblend"]["rows"]} == {None}
    assert json.loads((out / "npinv.json").read_text()) == {"edit_guidance": figures["recommended_guidance"]}
    card = (out / "MODEL_CARD.md").read_text()
    targets = card.split("## Targets")[1].split("##")[0]
    judged = [ln for ln in targets.splitlines() if ln.endswith(("| yes |", "| **no** |"))]
    # Six targets, and two more at w 7.5 when the sweep recommends another guidance.
    assert len(judged) == (6 if figures["recommended_guidance"] == 7.5 else 8)
    assert sum("at w 7.5" in ln for ln in judged) == (1 if figures["recommended_guidance"] == 7.5 else 3)
    assert "Without local blend" in card and card.rstrip().endswith("- older figures")
    assert "1 CPU" not in card and "2 CPU cores" in card
