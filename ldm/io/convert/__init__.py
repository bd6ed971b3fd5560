"""State-dict and config conversion between our CompVis-layout models and diffusers' layout.

Our ``AutoencoderKL`` (ldm.nets.autoencoder) and ``UNetModel`` (ldm.nets.unet) keep the CompVis / Stable
Diffusion key names; diffusers' ``AutoencoderKL`` and ``UNet2DConditionModel`` hold the same tensors under
other names (``down_blocks.{i}.resnets.{j}``, ``mid_block.attentions.0``, ...). The mapping here is derived
from the block structure (levels x blocks per level), so it covers every key of every supported config,
and both directions are exact inverses. Pure renaming: no numerical change except the VAE's attention
projections, which are 1x1 convolutions here and linear layers in diffusers (a reshape).

diffusers itself is never imported: it is a test-only dependency, used there as the reference.
"""

from ldm.io.convert.autoencoder import (
    autoencoder_from_diffusers,
    autoencoder_from_diffusers_config,
    autoencoder_key_map,
    autoencoder_to_diffusers,
    autoencoder_to_diffusers_config,
    check_diffusers_autoencoder,
)
from ldm.io.convert.common import ConversionError, key_report
from ldm.io.convert.unet import (
    check_diffusers_unet,
    unet_from_diffusers,
    unet_from_diffusers_config,
    unet_key_map,
    unet_to_diffusers,
    unet_to_diffusers_config,
)

__all__ = [
    "ConversionError",
    "key_report",
    "autoencoder_key_map",
    "autoencoder_to_diffusers",
    "autoencoder_from_diffusers",
    "autoencoder_to_diffusers_config",
    "autoencoder_from_diffusers_config",
    "check_diffusers_autoencoder",
    "unet_key_map",
    "unet_to_diffusers",
    "unet_from_diffusers",
    "unet_to_diffusers_config",
    "unet_from_diffusers_config",
    "check_diffusers_unet",
]
