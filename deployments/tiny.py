"""Tiny offline tokenizers, text encoders and a VAE shared by the model families' test builders.

Everything is built in code from fixed seeds, so a tiny pipeline needs no download and two
builds give identical weights. The tokenizers are the real transformers classes that the
diffusers pipelines record in model_index.json, so `save_pretrained` / `from_pretrained`
round-trips work like they do for production checkpoints.
"""

from __future__ import annotations

import string

import torch
from diffusers import AutoencoderKL
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2Tokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

# CLIP: a byte-level BPE without merges, laid out like the real vocab (bytes, then bytes that
# end a word, then the two specials), so every string encodes and ids still depend on the text.
_BYTES = sorted(pre_tokenizers.ByteLevel.alphabet())
_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_VOCAB = {tok: i for i, tok in enumerate(_BYTES + [b + "</w>" for b in _BYTES])}
_CLIP_VOCAB[_CLIP_BOS] = len(_CLIP_VOCAB)
_CLIP_VOCAB[_CLIP_EOS] = len(_CLIP_VOCAB)
CLIP_VOCAB_SIZE = len(_CLIP_VOCAB)
CLIP_BOS_ID, CLIP_EOS_ID = _CLIP_VOCAB[_CLIP_BOS], _CLIP_VOCAB[_CLIP_EOS]

# T5: a Unigram over printable ASCII, ids 0-2 being <pad>, </s>, <unk> as in the real T5 vocab;
# anything else becomes <unk>.
_T5_SPECIALS = ["<pad>", "</s>", "<unk>"]
_T5_PIECES = ["\u2581", *(c for c in string.printable if not c.isspace())]
_T5_VOCAB = [(tok, 0.0) for tok in _T5_SPECIALS] + [(p, -1.0) for p in _T5_PIECES]
T5_VOCAB_SIZE = len(_T5_VOCAB)
T5_PAD_ID, T5_EOS_ID = 0, 1


# Qwen2 (Qwen2.5-VL, Qwen3): byte-level BPE without merges, plus the chat-template and vision
# specials the Qwen pipelines write into their prompt templates.
QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_QWEN_VOCAB = {tok: i for i, tok in enumerate(_BYTES)}
QWEN_VOCAB_SIZE = len(_QWEN_VOCAB) + len(QWEN_SPECIALS)


def tiny_qwen2_tokenizer(model_max_length: int = 1024) -> Qwen2Tokenizer:
    """Byte-level Qwen2 tokenizer (the class Qwen-Image, its Edit variant and Z-Image use).
    Special tokens take ids after the 256 byte tokens, in QWEN_SPECIALS order."""
    tokenizer = Qwen2Tokenizer(
        vocab=dict(_QWEN_VOCAB),
        merges=[],
        model_max_length=model_max_length,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS[1:])})
    return tokenizer


def tiny_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """Character-level CLIP tokenizer; byte-level, so any text encodes without unknowns."""
    # transformers 5: CLIPTokenizer is the tokenizers-backed class; CLIPTokenizerFast aliases it.
    return CLIPTokenizer(
        vocab=dict(_CLIP_VOCAB),
        merges=[],
        unk_token=_CLIP_EOS,
        bos_token=_CLIP_BOS,
        eos_token=_CLIP_EOS,
        pad_token=_CLIP_EOS,
        model_max_length=model_max_length,
    )


def tiny_t5_tokenizer(model_max_length: int = 512) -> T5Tokenizer:
    """Character-level T5 tokenizer over printable ASCII; other characters map to <unk>."""
    # extra_ids=0: pipelines never use the sentinel tokens, and they would only grow the vocab.
    return T5Tokenizer(
        vocab=list(_T5_VOCAB),
        extra_ids=0,
        model_max_length=model_max_length,
    )


def tiny_clip_text_model(
    hidden_size: int = 32,
    vocab_size: int = CLIP_VOCAB_SIZE,
    seed: int = 0,
    max_position_embeddings: int = 77,
    with_projection: bool = False,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Two-layer CLIP text encoder matching `tiny_clip_tokenizer`; with_projection gives the
    projected variant (SDXL's second encoder)."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_position_embeddings,
        # The pooled output is read at the first eos id, so it must be the tokenizer's eos;
        # a wrong id silently pools the bos token and every prompt gets the same pooled vector.
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_EOS_ID,
    )
    torch.manual_seed(seed)
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


def tiny_t5_encoder(
    d_model: int = 32, vocab_size: int = T5_VOCAB_SIZE, seed: int = 0, umt5: bool = False
) -> T5EncoderModel | UMT5EncoderModel:
    """Two-layer T5 encoder matching `tiny_t5_tokenizer`; umt5 gives UMT5 (Wan's encoder)."""
    config_class = UMT5Config if umt5 else T5Config
    model_class = UMT5EncoderModel if umt5 else T5EncoderModel
    config = config_class(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // 2,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        # No dropout: a freshly built model is in train mode until eval(), and dropout would
        # make outputs depend on the global RNG.
        dropout_rate=0.0,
        pad_token_id=T5_PAD_ID,
        eos_token_id=T5_EOS_ID,
        decoder_start_token_id=T5_PAD_ID,
    )
    torch.manual_seed(seed)
    return model_class(config).eval()


def tiny_latent_vae(latent_channels: int, layers_per_block: int, seed: int = 0) -> AutoencoderKL:
    """A 4-channel AutoencoderKL with five blocks: vae_scale_factor 16, so a 1024x1024 image is
    a 64x64 latent and the full-resolution decoder convolutions stay cheap on a CPU. No latent
    scaling: the flow-matching pipelines compute latents / scaling_factor + shift_factor."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 5,
        up_block_types=("UpDecoderBlock2D",) * 5,
        block_out_channels=(4, 4, 4, 4, 4),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=2,
        sample_size=64,
        scaling_factor=1.0,
        shift_factor=0.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
