"""The latent diffusion model without Lightning: the model itself, its frozen first stage, editing, sharded sampling.

Nothing here imports Lightning (tests/test_architecture.py checks it): the model trains, samples and exports the
same way from a LightningModule, a plain loop or a notebook.
"""

from ldm.model.edit import LatentEdit
from ldm.model.first_stage import FirstStage
from ldm.model.latent_diffusion import LatentDiffusion
from ldm.model.sharded import sample_stream

__all__ = ["FirstStage", "LatentDiffusion", "LatentEdit", "sample_stream"]
