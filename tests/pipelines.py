"""Tiny random-weight diffusers pipeline folders for offline tests and benchmarks (nothing from the hub)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

MAX_TOKENS = 12


def _tokenizer(folder: Path):
    """A character-level CLIP BPE vocabulary (no merges) written here."""
    from transformers import CLIPTokenizer

    vocab = {}
    for suffix in ("", "</w>"):
        for char in "abcdefghijklmnopqrstuvwxyz":
            vocab[char + suffix] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS), vocab


def write_tiny_sd_pipeline(folder: Path, prediction_type: str = "epsilon") -> Path:
    """A StableDiffusionPipeline folder with random weights (UNet 8×8×4 latents, VAE to 16×16 RGB, 2-layer CLIP
    text encoder of width 16, character-level tokenizer), written with save_pretrained; SD v1 scheduler settings."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )
    # Random init leaves some layers at zero (conv_out, attention outputs); noise makes them matter.
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8, sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    tokenizer, vocab = _tokenizer(folder.parent / f"vocab-{folder.name}")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    ))
    # Stable Diffusion v1's scheduler settings.
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1,
        set_alpha_to_one=False, prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder
