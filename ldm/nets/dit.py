"""DiT, the Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"):
a plain ViT over latent patches whose blocks are conditioned by adaLN-Zero, as a drop-in for the UNet.

x (B, C, H, W) -> patchify (conv, stride p) + fixed 2-D sin-cos positions -> (B, T, D), T = HW / p^2
  -> N blocks [adaLN self-attention -> (cross-attention on context) -> adaLN MLP], each residual branch
     gated by the conditioning c = t_embedder(t) + y_embedder(y) (B, D)
  -> adaLN final layer -> linear to p*p*C_out per token -> unpatchify -> (B, C_out, H, W)

Module names follow facebookresearch/DiT `models.py`, so the official checkpoints load without renaming
(`x_embedder.proj`, `t_embedder.mlp`, `y_embedder.embedding_table`, `pos_embed`, `blocks.N.attn.qkv/proj`,
`blocks.N.mlp.fc1/fc2`, `blocks.N.adaLN_modulation.1`, `final_layer.*`); the optional cross-attention
follows PixArt-alpha (Chen et al. 2023): `blocks.N.cross_attn.q_linear/kv_linear/proj`.

The network knows nothing about diffusion: it maps (x, t, condition) to a tensor shaped like x (twice
the channels with learn_sigma). Condition dropout for classifier-free guidance is the Conditioner's job
(ldm.nets.conditioners); the label table only reserves the null class id it substitutes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.nets.backbone import check_denoiser_inputs


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: int = 0
) -> torch.Tensor:
    """Sinusoidal (B,) -> (B, dim) laid out [cos | sin] with frequencies max_period^(-i / (half - freq_shift)).

    freq_shift=0 is official DiT (and CompVis); diffusers' DiTTransformer2DModel hard-codes
    `downscale_freq_shift=1`, i.e. slightly higher frequencies, so exact equality with it needs 1."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / (half - freq_shift)
    args = timesteps.float()[:, None] * torch.exp(-math.log(max_period) * exponent)[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, base_h: int, base_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions (B=1 broadcast) -> (1, grid_h * grid_w, dim), row-major tokens.

    The first dim/2 channels encode the column, the rest the row (the MAE/DiT layout the official weights
    were trained with). A grid other than the trained base grid is stretched onto it (positions scaled by
    base / grid, as diffusers' PatchEmbed does) so frequencies stay in the range the model saw."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need hidden_size divisible by 4, got {dim}.")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)

    def axis(n: int, base: int) -> torch.Tensor:
        out = torch.outer(torch.arange(n, dtype=torch.float64) * (base / n), omega)  # (n, D/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (n, D/2)

    cols = axis(grid_w, base_w)[None, :, :].expand(grid_h, -1, -1)  # (h, w, D/2)
    rows = axis(grid_h, base_h)[:, None, :].expand(-1, grid_w, -1)  # (h, w, D/2)
    return torch.cat([cols, rows], dim=-1).reshape(1, grid_h * grid_w, dim).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample affine (B, D) on normalised tokens (B, T, D); 1 + scale so zero means identity."""
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    """(B,) float timesteps -> sinusoidal features -> MLP -> (B, D)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: int = 0):
        super().__init__()
        self.frequency_embedding_size, self.freq_shift = frequency_embedding_size, freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(timesteps, self.frequency_embedding_size, freq_shift=self.freq_shift)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """(B,) integer labels -> (B, D) rows of a table with `num_classes` rows, the null class included."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class VectorEmbedder(nn.Module):
    """(B, adm_in_channels) pooled vector (SDXL-style `adm` conditioning) -> MLP -> (B, D)."""

    def __init__(self, in_channels: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.mlp(y.to(self.mlp[0].weight.dtype))


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D): a stride-p convolution is a linear map of each p x p patch."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, L, H*hd) -> (B, H, L, hd)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)  # (B, H, L, hd) -> (B, L, H*hd)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused `qkv` projection (timm's layout: rows q | k | v)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, T, hd)
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class CrossAttention(nn.Module):
    """Tokens attend to context tokens (B, L, context_dim): queries `q_linear`, fused keys/values `kv_linear`
    (PixArt-alpha names). mask (B, L) bool: True where a context token may be attended to."""

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q = _split_heads(self.q_linear(x), self.num_heads)  # (B, H, T, hd)
        k, v = (_split_heads(t, self.num_heads) for t in self.kv_linear(context).chunk(2, dim=-1))  # (B, H, L, hd)
        attn_mask = None
        if mask is not None:
            if mask.shape != context.shape[:2]:
                raise ValueError(f"context_mask must be (B, L) = {tuple(context.shape[:2])}, got {tuple(mask.shape)}.")
            mask = mask.to(device=x.device, dtype=torch.bool)
            if not bool(mask.any(dim=1).all()):
                raise ValueError("context_mask hides every token of some sample; keep at least one True per row.")
            attn_mask = mask[:, None, None, :]  # (B, 1, 1, L): broadcast over heads and queries
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)))


class Mlp(nn.Module):
    """Transformer feed-forward: fc1 -> tanh-approximated GELU (as official DiT) -> fc2."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block: c (B, D) regresses shift/scale/gate for the attention and MLP branches.

    With context_dim, an ungated cross-attention sits between them (PixArt-alpha: self-attn -> cross-attn ->
    MLP); its `proj` starts at zero so the whole block still starts as the identity map.
    """

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        # no affine parameters: adaLN supplies per-sample scale and shift
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.cross_attn = CrossAttention(hidden_size, context_dim, num_heads) if context_dim is not None else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.gradient_checkpointing = gradient_checkpointing

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # recompute the block's activations in backward instead of storing them: memory for compute
            return checkpoint(self._forward, x, c, context, context_mask, use_reentrant=False)
        return self._forward(x, c, context, context_mask)

    def _forward(self, x, c, context, context_mask) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, T, D)
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, context, context_mask)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate) then a linear map of each token to its p*p*C_out patch values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p*p*C_out)


class DiT(nn.Module):
    """Diffusion Transformer backbone with the UNet's interface: forward(x, timesteps, context, y).

    Args:
        input_size: latent height = width the fixed `pos_embed` buffer is built for (official: 32 for 256 px);
            other sizes divisible by patch_size work, their positions stretched onto this grid.
        patch_size: p; the token count is H*W / p^2, so compute grows as 1 / p^2.
        in_channels: input channels, including any the caller concatenates (inpainting mask, ...).
        out_channels: output channels; defaults to in_channels. learn_sigma doubles it (official DiT's
            learned variance: mean prediction in the first half, variance interpolation in the second; the model
            uses the first half only, see ``ldm.nets.backbone.run_backbone``).
        hidden_size, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP expansion.
        num_classes: class-conditional: `y` (B,) labels index an embedding table of `num_classes` rows that
            is added to the timestep embedding. As with the UNet's `label_emb`, this counts every label id,
            the null class of classifier-free guidance included (ImageNet: 1000 classes + null = 1001, the
            official table; the Conditioner's null id is the last row).
        adm_in_channels: vector-conditional: `y` (B, adm_in_channels) through an MLP; excludes num_classes.
        context_dim: width of context tokens (B, L, context_dim) for cross-attention in every block; None
            for none.
        gradient_checkpointing: recompute each block in backward to save activation memory.
        timestep_freq_shift: 0 = official DiT timestep frequencies; 1 = diffusers' DiTTransformer2DModel.
    """

    # The blocks FSDP shards as one unit each (ldm.nets.backbone).
    fsdp_units = ("DiTBlock",)

    def __init__(
        self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, out_channels: int | None = None,
        hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
        num_classes: int | None = None, adm_in_channels: int | None = None, context_dim: int | None = None,
        learn_sigma: bool = False, gradient_checkpointing: bool = False, timestep_freq_shift: int = 0,
    ):
        super().__init__()
        if num_classes is not None and adm_in_channels is not None:
            raise ValueError("Use either num_classes (label y) or adm_in_channels (vector y), not both.")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}.")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by the patch size {patch_size}.")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}.")
        self.in_channels, self.patch_size, self.input_size = in_channels, patch_size, input_size
        self.learn_sigma = learn_sigma
        base_out = in_channels if out_channels is None else out_channels
        self.out_channels = 2 * base_out if learn_sigma else base_out
        self.hidden_size, self.depth, self.num_heads, self.mlp_ratio = hidden_size, depth, num_heads, mlp_ratio
        self.num_classes, self.adm_in_channels, self.context_dim = num_classes, adm_in_channels, context_dim
        self.timestep_freq_shift = timestep_freq_shift

        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift)
        if num_classes is not None:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        elif adm_in_channels is not None:
            self.y_embedder = VectorEmbedder(adm_in_channels, hidden_size)
        else:
            self.y_embedder = None
        grid = input_size // patch_size
        # persistent: official checkpoints carry `pos_embed`, and strict loading then checks the grid size
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, grid, grid, grid, grid))
        self._grid_positions: dict[tuple, torch.Tensor] = {}  # other grids' positions; not state (from sizes alone)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim, gradient_checkpointing) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The paper's initialisation; the zeros make every block the identity and the output exactly 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # the patch convolution is a linear map of a flattened patch: initialise it as one
        nn.init.xavier_uniform_(self.x_embedder.proj.weight.view(self.hidden_size, -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if isinstance(self.y_embedder, LabelEmbedder):
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zeroed = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for block in self.blocks:
            zeroed.append(block.adaLN_modulation[-1])
            if block.cross_attn is not None:
                zeroed.append(block.cross_attn.proj)  # ungated branch: zero output keeps adaLN-Zero's identity
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, grid_h * grid_w, D) positional embedding for a token grid."""
        base = self.input_size // self.patch_size
        if (grid_h, grid_w) == (base, base):
            return self.pos_embed
        # Other grids (aspect buckets, other resolutions) are built once per grid and device: rebuilt per
        # forward, each would be a float64 computation on the CPU and a host-to-device copy every step.
        key = (grid_h, grid_w, self.pos_embed.device)
        if key not in self._grid_positions:
            positions = sincos_pos_embed_2d(self.hidden_size, grid_h, grid_w, base, base)
            self._grid_positions[key] = positions.to(self.pos_embed.device)
        return self._grid_positions[key]

    def unpatchify(self, tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """(B, h*w, p*p*C) -> (B, C, h*p, w*p); each token's values are laid out (p, p, C), as official DiT."""
        p, c = self.patch_size, self.out_channels
        x = tokens.reshape(tokens.shape[0], grid_h, grid_w, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(tokens.shape[0], c, grid_h * p, grid_w * p)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
        y: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, in_channels, H, W), timesteps (B,) float or long, context (B, L, context_dim),
        y (B,) labels or (B, adm_in_channels), context_mask (B, L) bool -> (B, out_channels, H, W)."""
        self._check_inputs(x, timesteps, context, y)
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        h = self.x_embedder(x)  # (B, T, D)
        h = h + self.positions(grid_h, grid_w).to(h.dtype)
        c = self.t_embedder(timesteps)  # (B, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c, context, context_mask)
        h = self.final_layer(h, c)  # (B, T, p*p*C_out)
        return self.unpatchify(h, grid_h, grid_w).type(x.dtype)

    def _check_inputs(self, x, timesteps, context, y) -> None:
        check_denoiser_inputs("DiT", x, timesteps, context, y, in_channels=self.in_channels,
                              context_dim=self.context_dim, num_classes=self.num_classes,
                              adm_in_channels=self.adm_in_channels)
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(
                f"Latent height and width {tuple(x.shape[-2:])} must be divisible by the DiT patch size "
                f"{self.patch_size}; pick a latent size that is a multiple of {self.patch_size} or another patch size."
            )


# Size presets (the paper's Table 1): depth / width / heads, the suffix is the patch size; kwargs override.
def dit_tiny(**kwargs) -> DiT:  # CPU-sized: tests and MNIST-scale runs
    return DiT(**{"depth": 4, "hidden_size": 128, "patch_size": 2, "num_heads": 4, **kwargs})


def dit_s_2(**kwargs) -> DiT:
    return DiT(**{"depth": 12, "hidden_size": 384, "patch_size": 2, "num_heads": 6, **kwargs})


def dit_b_2(**kwargs) -> DiT:
    return DiT(**{"depth": 12, "hidden_size": 768, "patch_size": 2, "num_heads": 12, **kwargs})


def dit_l_2(**kwargs) -> DiT:
    return DiT(**{"depth": 24, "hidden_size": 1024, "patch_size": 2, "num_heads": 16, **kwargs})


def dit_xl_2(**kwargs) -> DiT:
    return DiT(**{"depth": 28, "hidden_size": 1152, "patch_size": 2, "num_heads": 16, **kwargs})
