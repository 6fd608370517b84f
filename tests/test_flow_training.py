"""train-scenes for the flow model: an SD3 pipeline on the UNet model's frozen VAE and text encoder,
reproducible and resumable; its folder loads in npinv and in diffusers alone; its card measures it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from npinv import flow_training, training
from npinv.cli import main
from npinv.model import embedded_model_path, load_model

TINY_FLOW = {
    "name": "tiny-flow", "seed": 5, "resolution": 64, "train_scenes": 48, "captions": "balanced", "init": "shapes64",
    "text": {"max_sequence_length": 0},
    "scheduler": {"shift": 1.0},
    "transformer": {"patch_size": 2, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16,
                    "qk_norm": "rms_norm", "pos_embed_max_size": 16, "steps": 4, "batch_size": 4, "lr": 0.0003,
                    "warmup": 2, "caption_dropout": 0.25, "ema_decay": 0.999,
                    "grounding": {"token_weight": 0.1, "pixel_weight": 0.02}},
    "checkpoint_every": 2,
}


def _config(folder: Path, **changes) -> Path:
    path = folder / "flow_config.json"
    path.write_text(json.dumps(json.loads(json.dumps(TINY_FLOW)) | changes))
    return path


def _weights(folder: Path, parts=("transformer",)) -> dict[str, torch.Tensor]:
    out = {}
    for part in parts:
        for f in (folder / part).glob("*.safetensors"):
            out |= {f"{part}.{k}": v for k, v in load_file(f).items()}
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flow_train")
    assert main(["train-scenes", "--config", str(_config(root)), "--out", str(root / "whole")]) == 0
    return root / "whole"


def test_resumed_flow_run_gives_the_uninterrupted_weights(trained, tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    real_save = training._save_ckpt

    def save_then_crash(path, **state):
        real_save(path, **state)
        if path.name == flow_training.CHECKPOINT:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "_save_ckpt", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        training.train_scenes(cfg, tmp_path / "split")
    monkeypatch.setattr(training, "_save_ckpt", real_save)
    assert not (tmp_path / "split").exists()
    assert torch.load(tmp_path / "split.run" / flow_training.CHECKPOINT, weights_only=False)["step"] == 2
    assert main(["train-scenes", "--config", str(cfg), "--out", str(tmp_path / "split")]) == 2  # not without --resume
    assert main(["train-scenes", "--config", str(cfg), "--out", str(tmp_path / "split"), "--resume"]) == 0
    whole, split = _weights(trained), _weights(tmp_path / "split")
    assert whole.keys() == split.keys() and len(whole) > 50
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    log = [json.loads(x) for x in (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()]
    assert any(r.get("token") is not None for r in log if r["stage"] == "transformer")  # the grounding loss ran


def test_flow_folder_keeps_the_unet_models_frozen_parts(trained):
    base = _weights(embedded_model_path(), ("text_encoder", "vae"))
    mine = _weights(trained, ("text_encoder", "text_encoder_2", "vae"))
    for key, value in base.items():
        part, name = key.split(".", 1)
        if part == "vae":
            assert torch.equal(mine[key], value)
        else:  # transformers 5 saves CLIPTextModel flat, CLIPTextModelWithProjection under text_model.
            for slot in ("text_encoder", "text_encoder_2"):
                assert torch.equal(mine[f"{slot}.text_model.{name.removeprefix('text_model.')}"], value)
    projection = mine["text_encoder.text_projection.weight"].float()
    assert torch.equal(projection, torch.eye(projection.shape[0]))
    vae = json.loads((trained / "vae" / "config.json").read_text())
    assert vae["shift_factor"] is not None and vae["scaling_factor"] > 0
    assert json.loads((trained / "npinv.json").read_text()) == {"max_sequence_length": 0}
    index = json.loads((trained / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]


def test_flow_folder_loads_in_npinv_and_in_diffusers_alone(trained):
    from diffusers import StableDiffusion3Pipeline

    model = load_model(str(trained))
    assert model.is_flow and model.family == "sd3" and model.max_sequence_length == 0
    emb = model.encode_prompt("a red circle on a blue background")
    assert emb.hidden.shape[1] == model.pipe.tokenizer.model_max_length  # CLIP rows only: no T5 zeros
    pipe = StableDiffusion3Pipeline.from_pretrained(trained, text_encoder_3=None, tokenizer_3=None,
                                                    torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    hidden, _, pooled, _ = pipe.encode_prompt("a red circle on a blue background", None, None,
                                              do_classifier_free_guidance=False, max_sequence_length=0)
    assert torch.equal(hidden, emb.hidden) and torch.equal(pooled, emb.pooled)
    image = pipe("a red circle on a blue background", max_sequence_length=0, num_inference_steps=2, height=64,
                 width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_grounding_recorder_keeps_joint_maps_with_gradients_and_restores_processors(trained):
    model = load_model(str(trained))
    transformer = model.transformer.train()
    before = {k: type(v) for k, v in transformer.attn_processors.items()}
    recorder = flow_training._JointRecorder()
    emb = model.encode_prompt("a red circle on a blue background")
    z = torch.randn(1, 4, 16, 16)
    with flow_training._recording(transformer, recorder, 2):
        transformer.requires_grad_(True)
        out = transformer(hidden_states=z, timestep=torch.tensor([500.0]), encoder_hidden_states=emb.hidden,
                          pooled_projections=emb.pooled, return_dict=False)[0]
    assert len(recorder.maps) == TINY_FLOW["transformer"]["num_layers"]
    for m in recorder.maps:  # (B, heads, image tokens, text tokens), a distribution over the text keys
        assert m.shape == (1, 2, 64, 32) and torch.allclose(m.sum(-1), torch.ones(1, 2, 64))
    recorder.maps[0][..., 3].mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in transformer.parameters())
    assert {k: type(v) for k, v in transformer.attn_processors.items()} == before
    assert out.shape == z.shape


def test_flow_model_card_measures_every_target(trained, tmp_path):
    import shutil

    from npinv import modelcard_flow

    out = tmp_path / "m"
    shutil.copytree(trained, out)
    assert modelcard_flow.main(["--model", str(out), "--n-vae", "2", "--n-captions", "2", "--n-recon", "1",
                                "--steps", "2,3", "--sample-steps", "2", "--n-edit", "1", "--edit-steps", "3",
                                "--n-iou", "2", "--iou-steps", "3"]) == 0
    figures = json.loads((out / "model_card_figures.json").read_text())
    assert [s["guidance"] for s in figures["samples"]] == list(modelcard_flow.SAMPLE_GUIDANCES)
    assert 0 <= figures["localisation"]["object_iou"] <= 1 and figures["bundle_mb"] > 0
    assert json.loads((out / "npinv.json").read_text()) == {
        "max_sequence_length": 0, "edit_guidance": figures["recommended_guidance"],
        "edit_self_replace": figures["recommended_self_replace"]}  # what the edit commands then default to
    card = (out / "MODEL_CARD.md").read_text()
    targets = card.split("## Targets")[1].split("##")[0]
    judged = [ln for ln in targets.splitlines() if ln.endswith(("| yes |", "| **no** |"))]
    assert len(judged) == len(modelcard_flow.TARGETS) + 1  # and the edit target at the default self-replace
    assert figures["recommended_self_replace"] in modelcard_flow.SELF_REPLACE
    assert (out / "loss_curve.png").is_file() and (out / "samples.png").is_file()
    assert "{" not in card  # every field filled
    assert modelcard_flow.main(["--model", str(out), "--card-only"]) == 0
    assert (out / "MODEL_CARD.md").read_text() == card
