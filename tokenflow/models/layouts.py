"""Model architecture configs shared by the tiny test model and the benchmark's real-size models
(plain data: importing this module imports nothing heavy)."""

# The Stable Diffusion 1.x / 2.x UNet block layout (the 16 transformer blocks and module paths
# TokenFlow hooks into), without the widths, heads and text dimension that tell the models apart:
# the tiny test model and the benchmark's real-size architectures both start from it.
SD_UNET_LAYOUT = dict(
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    only_cross_attention=False,
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_eps=1e-5,
    upcast_attention=False,
    resnet_time_scale_shift="default",
)

# The Stable Diffusion VAE (KL-f8, 4 latent channels, scaling factor 0.18215) without its widths.
SD_VAE_LAYOUT = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    scaling_factor=0.18215,
)

# The SDXL UNet block layout (stabilityai/stable-diffusion-xl-base-1.0) without its widths: three
# levels, attention only at the last two, 2 and 10 transformer blocks per attention there (and 10 in
# the mid block): 70 transformer blocks; the added text/time embedding ("text_time": the pooled
# text embedding and 6 micro-conditioning time ids, each id embedded with addition_time_embed_dim).
SDXL_UNET_LAYOUT = dict(
    SD_UNET_LAYOUT,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    addition_embed_type="text_time",
    use_linear_projection=True,
)

# The SDXL VAE: SD's layout with another scaling factor; it overflows in float16 (force_upcast).
SDXL_VAE_LAYOUT = dict(SD_VAE_LAYOUT, scaling_factor=0.13025, force_upcast=True)
