"""Tiny randomly initialised models in the formats the model backends load.

Nothing is downloaded: the tokenizer is built here from a small word-level
vocabulary, the models from small configs of the real architectures (SDXL's
UNet with ``addition_embed_type="text_time"`` and two CLIP text encoders; WAN
2.1's transformer, VAE and a UMT5 encoder; a Llama causal LM with a chat
template), each saved with ``save_pretrained`` as the loaders read it. The SDXL
model is also written as a single-file checkpoint in the original (Stability AI /
LDM) key layout that A1111 and ComfyUI checkpoints use (:func:`sdxl_single_file`).
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
        cross_attention_dim=16 + 24, norm_num_groups=4)  # the two encoders' widths, concatenated
    vae = AutoencoderKL(block_out_channels=[4, 4, 4, 4], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4,
                        norm_num_groups=2, layers_per_block=1, sample_size=1024)
    tok = tokenizer(77)
    cfg = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, num_attention_heads=2,
               num_hidden_layers=2, vocab_size=vocab_size(), max_position_embeddings=77,
               hidden_act="gelu", projection_dim=16)
    # Two widths, as in SDXL (768 and 1280): diffusers' single-file loader tells the two
    # encoders' weights apart by the width of their position embeddings.
    enc1 = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, **cfg))
    enc2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=24, intermediate_size=48, **cfg))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=enc1, text_encoder_2=enc2, tokenizer=tok,
                                     tokenizer_2=tok, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder


def sdxl_single_file(folder: Path, checkpoint: Path, config: Path) -> tuple[Path, Path]:
    """The diffusers SDXL ``folder`` as one ``.safetensors`` file in the original key layout
    (UNet ``model.diffusion_model.*``, VAE ``first_stage_model.*``, CLIP ViT-L
    ``conditioner.embedders.0.transformer.*``, OpenCLIP bigG ``conditioner.embedders.1.model.*``),
    and ``config``: the same folder without weights (model_index.json, component configs,
    tokenizers), which is what ``SDXL_CONFIG_PATH`` holds for a real checkpoint.

    The key layout is the one diffusers' single-file loader converts from
    (``diffusers.loaders.single_file_utils``; its scripts/convert_diffusers_to_original_sdxl.py
    goes the same way, for SDXL's own block counts only); this one follows the configs.
    Given ``config=``, the loader infers nothing from the keys: the model type would
    otherwise come from ``...resblocks.9...``, a layer a tiny encoder does not have.
    """
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    def weights(sub: str, name: str) -> dict:
        return load_file(str(folder / sub / name))

    layers = json.loads((folder / "unet" / "config.json").read_text())["layers_per_block"]
    n_up = len(json.loads((folder / "vae" / "config.json").read_text())["up_block_types"])
    state = {}
    for prefix, converted in (
            ("model.diffusion_model.", _ldm_unet(weights("unet", "diffusion_pytorch_model.safetensors"), layers)),
            ("first_stage_model.", _ldm_vae(weights("vae", "diffusion_pytorch_model.safetensors"), n_up)),
            ("conditioner.embedders.0.transformer.", _ldm_clip(weights("text_encoder", "model.safetensors"))),
            ("conditioner.embedders.1.model.", _open_clip(weights("text_encoder_2", "model.safetensors")))):
        state.update((prefix + k, v.contiguous()) for k, v in converted.items())
    save_file(state, str(checkpoint))
    shutil.copytree(folder, config, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return checkpoint, config


_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
               "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
_LDM_UNET = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _ldm_unet(sd: dict, layers: int) -> dict:
    """UNet: LDM numbers each level's resnets (``.0``, attention ``.1``) and then its
    down/upsampler as consecutive ``input_blocks``/``output_blocks``."""
    per = layers + 1
    up_attn = {k.split(".")[1] for k in sd if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for key, w in sd.items():
        p = key.split(".")
        if ".".join(p[:-1]) in _LDM_UNET:
            new = f"{_LDM_UNET['.'.join(p[:-1])]}.{p[-1]}"
        elif p[0] in ("down_blocks", "up_blocks"):
            i, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
            down = p[0] == "down_blocks"
            blocks, first = ("input_blocks", 1 + i * per) if down else ("output_blocks", i * per)
            if kind == "resnets":
                new = f"{blocks}.{first + j}.0.{_LDM_RESNET.get(rest[0], rest[0])}.{'.'.join(rest[1:])}"
            elif kind == "attentions":
                new = f"{blocks}.{first + j}.1.{'.'.join(rest)}"
            elif kind == "downsamplers":  # rest: conv.<param>
                new = f"input_blocks.{first + layers}.0.op.{rest[-1]}"
            else:  # upsamplers, after the level's attention when it has one
                new = f"output_blocks.{first + layers}.{2 if p[1] in up_attn else 1}.conv.{rest[-1]}"
        elif p[0] == "mid_block":
            kind, j, rest = p[1], int(p[2]), p[3:]
            new = (f"middle_block.{2 * j}.{_LDM_RESNET.get(rest[0], rest[0])}.{'.'.join(rest[1:])}"
                   if kind == "resnets" else f"middle_block.1.{'.'.join(rest)}")
        else:
            raise ValueError(f"no original-layout name for UNet weight {key}")
        out[new] = w
    return out


_LDM_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def _ldm_vae(sd: dict, n_up: int) -> dict:
    """VAE: ``down.i.block.j``, ``mid.block_1/attn_1/block_2``; the decoder's ``up.i`` count
    from the lowest resolution's other end; the mid attention's projections are 1x1 convs."""
    def resnet(rest: list[str]) -> str:
        return ".".join(["nin_shortcut" if rest[0] == "conv_shortcut" else rest[0], *rest[1:]])

    out = {}
    for key, w in sd.items():
        p = key.split(".")
        part = p[0]
        if p[1] == "down_blocks":
            new = (f"{part}.down.{p[2]}.block.{p[4]}.{resnet(p[5:])}" if p[3] == "resnets"
                   else f"{part}.down.{p[2]}.downsample.{'.'.join(p[5:])}")
        elif p[1] == "up_blocks":
            i = n_up - 1 - int(p[2])
            new = (f"{part}.up.{i}.block.{p[4]}.{resnet(p[5:])}" if p[3] == "resnets"
                   else f"{part}.up.{i}.upsample.{'.'.join(p[5:])}")
        elif p[1] == "mid_block" and p[2] == "resnets":
            new = f"{part}.mid.block_{int(p[3]) + 1}.{resnet(p[4:])}"
        elif p[1] == "mid_block":
            name = _LDM_VAE_ATTN[p[4]]
            new = f"{part}.mid.attn_1.{name}.{p[-1]}"
            if name != "norm" and w.ndim == 2:
                w = w[:, :, None, None]
        elif p[1] == "conv_norm_out":
            new = f"{part}.norm_out.{p[2]}"
        else:  # conv_in, conv_out, quant_conv, post_quant_conv
            new = key
        out[new] = w
    return out


def _ldm_clip(sd: dict) -> dict:
    """CLIP ViT-L: transformers' own names, under ``text_model.`` (which transformers 5
    flattened away in CLIPTextModel)."""
    return {"text_model." + k.removeprefix("text_model."): w for k, w in sd.items()}


_OPEN_CLIP = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                    "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}


def _open_clip(sd: dict) -> dict:
    """OpenCLIP: ``transformer.resblocks.N`` with q, k and v in one ``in_proj``, and
    ``text_projection`` as the matrix that multiplies from the right (the Linear's transpose)."""
    import torch

    out, qkv = {}, {}
    for key, w in sd.items():
        k = key.removeprefix("text_model.")
        if k == "text_projection.weight":
            out["text_projection"] = w.T
        elif k in _OPEN_CLIP:
            out[_OPEN_CLIP[k]] = w
        elif k.startswith("encoder.layers."):
            p = k.split(".")
            n, module, param = p[2], ".".join(p[3:-1]), p[-1]
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((n, param), {})[module[len("self_attn.")]] = w
            else:
                out[f"transformer.resblocks.{n}.{_OPEN_CLIP_LAYER[module]}.{param}"] = w
        else:
            raise ValueError(f"no OpenCLIP name for text encoder weight {key}")
    for (n, param), parts in qkv.items():
        out[f"transformer.resblocks.{n}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def wan(folder: Path) -> Path:
    """A diffusers-format WAN 2.1 T2V folder (VAE: 8x spatial, 4x temporal, like the real one)."""
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    # The decoder's last block works at the full size for every frame (85 x 480 x 832 for a
    # video job): one channel there, two in the blocks before it (an upsampling halves the
    # channels, so two is their least) make the 83-frame job ~20 s on one CPU core, not ~50.
    vae = AutoencoderKLWan(base_dim=1, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
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
