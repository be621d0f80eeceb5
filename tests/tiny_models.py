"""Tiny randomly initialised models in the formats the model backends load.

Nothing is downloaded: the tokenizer is built here from a small word-level
vocabulary, the models from small configs of the real architectures (SDXL's
UNet with ``addition_embed_type="text_time"`` and two CLIP text encoders; WAN
2.1's transformer, VAE and a UMT5 encoder; a Llama causal LM with a chat
template), each saved with ``save_pretrained`` as the loaders read it.
"""
from __future__ import annotations

from pathlib import Path

WORDS = ("a an the of and with in on at red blue green kite cat dog city night sky sea "
         "forest light dark cinematic detailed sharp focus blurry ugly watermark video image "
         "camera motion smooth portrait painting photo glowing river mountain sun moon").split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def tokenizer(max_length: int, *, chat: bool = False):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + [",", ".", ":", "'", "assistant",
                                                              "system", "user"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", model_max_length=max_length)
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def vocab_size() -> int:
    return len(SPECIALS) + len(WORDS) + 7


def sdxl(folder: Path) -> Path:
    """A diffusers-format SDXL folder (8x VAE, so latents are 1/8 of the image as in SDXL)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=128, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 16,
        cross_attention_dim=32, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=[4, 4, 4, 4], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4,
                        norm_num_groups=2, layers_per_block=1, sample_size=1024)
    tok = tokenizer(77)
    cfg = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=16, intermediate_size=32,
               num_attention_heads=2, num_hidden_layers=2, vocab_size=vocab_size(),
               max_position_embeddings=77, hidden_act="gelu", projection_dim=16)
    enc1 = CLIPTextModel(CLIPTextConfig(**cfg))
    enc2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=enc1, text_encoder_2=enc2, tokenizer=tok,
                                     tokenizer_2=tok, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder


def wan(folder: Path) -> Path:
    """A diffusers-format WAN 2.1 T2V folder (VAE: 8x spatial, 4x temporal, like the real one)."""
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(
        patch_size=(1, 4, 4), num_attention_heads=2, attention_head_dim=8, in_channels=16,
        out_channels=16, text_dim=16, freq_dim=32, ffn_dim=16, num_layers=1, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    enc = UMT5EncoderModel(UMT5Config(vocab_size=vocab_size(), d_model=16, d_kv=8, d_ff=32,
                                      num_layers=1, num_heads=2, relative_attention_num_buckets=8,
                                      pad_token_id=0, eos_token_id=2, decoder_start_token_id=0))
    pipe = WanPipeline(tokenizer=tokenizer(512), text_encoder=enc, transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    pipe.save_pretrained(folder)
    return folder


def causal_lm(folder: Path) -> Path:
    """A tiny Llama with a chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size(), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model.save_pretrained(folder)
    tokenizer(512, chat=True).save_pretrained(folder)
    return folder
