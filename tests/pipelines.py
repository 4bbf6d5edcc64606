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


def _noisy(module: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Random init leaves some layers at zero (output projections, AdaLN modulations); noise makes them matter."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn_like(parameter))
    return module


def _flow_vae(latent_channels: int, shift_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16), norm_num_groups=8,
        sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=1.5, shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False,
    )


FLOW_EMBED_DIM, FLOW_POOLED_DIM, FLOW_TOKENS = 16, 16, 6


def write_flow_prompt_embeds(path: Path, prompts: int = 3, negative: bool = True, seed: int = 1) -> Path:
    """A safetensors file of precomputed SD3/FLUX text conditioning: `prompt_embeds` (P, L, D), `pooled_prompt_embeds`
    (P, D_pool), and (with `negative`) `negative_prompt_embeds` (1, L, D), `negative_pooled_prompt_embeds` (1, D_pool)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "prompt_embeds": torch.randn(prompts, FLOW_TOKENS, FLOW_EMBED_DIM, generator=gen),
        "pooled_prompt_embeds": torch.randn(prompts, FLOW_POOLED_DIM, generator=gen),
    }
    if negative:
        tensors["negative_prompt_embeds"] = torch.randn(1, FLOW_TOKENS, FLOW_EMBED_DIM, generator=gen)
        tensors["negative_pooled_prompt_embeds"] = torch.randn(1, FLOW_POOLED_DIM, generator=gen)
    save_file(tensors, str(path))
    return path


def write_tiny_sd3_pipeline(folder: Path, shift: float = 3.0, dynamic: bool = False, text_encoders: bool = False) -> Path:
    """A StableDiffusion3Pipeline folder with random weights (1-layer SD3 transformer on 8×8×4 latents, VAE to 16×16
    RGB); FlowMatchEulerDiscreteScheduler with SD3's shift 3 (or dynamic shifting). No text encoders (conditioning
    comes as precomputed prompt_embeds), or with `text_encoders` the two CLIP encoders (width 8 each, projections 8,
    character-level tokenizers) and no T5, which SD3 makes optional."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = _noisy(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=FLOW_EMBED_DIM, caption_projection_dim=16,
        pooled_projection_dim=FLOW_POOLED_DIM, pos_embed_max_size=16,
    ))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=dynamic)
    encoders = {}
    if text_encoders:
        for suffix in ("", "_2"):
            tokenizer, vocab = _tokenizer(folder.parent / f"vocab-{folder.name}{suffix}")
            encoders[f"tokenizer{suffix}"] = tokenizer
            encoders[f"text_encoder{suffix}"] = CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=len(vocab), hidden_size=FLOW_EMBED_DIM // 2, intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=FLOW_POOLED_DIM // 2,
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
            ))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=_flow_vae(4, 0.1), text_encoder=encoders.get("text_encoder"),
        tokenizer=encoders.get("tokenizer"), text_encoder_2=encoders.get("text_encoder_2"), tokenizer_2=encoders.get("tokenizer_2"),
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.save_pretrained(folder)
    return folder


def write_tiny_flux_pipeline(folder: Path, guidance_embeds: bool = True) -> Path:
    """A FluxPipeline folder with random weights (1 + 1-layer FLUX transformer on 4-channel latents packed 2×2,
    guidance-embedded like FLUX-dev, VAE to pixels at 2× the latent size), no text encoders; FLUX's dynamically
    shifted FlowMatchEulerDiscreteScheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = _noisy(FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=FLOW_EMBED_DIM, pooled_projection_dim=FLOW_POOLED_DIM, guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    ))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_flow_vae(4, 0.1), text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None,
    )
    pipe.save_pretrained(folder)
    return folder
