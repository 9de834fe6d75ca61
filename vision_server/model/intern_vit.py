"""InternViT: the vision transformer of InternVL, with OpenGVLab's parameter names.

Pre-norm blocks with layer scale: ``x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x))``.
Attention uses a fused ``qkv`` projection, optional RMS q/k normalisation over the full width
(InternViT-6B), and PyTorch's scaled-dot-product attention (flash/memory-efficient kernels on
CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from checkpoints.spec import VisionTowerSpec


class RMSNorm(nn.Module):
    """InternViT's RMSNorm: normalise in float32, round to the input dtype, *then* scale.

    Not ``torch.nn.RMSNorm``: that one scales before rounding, which is bit-identical in
    float32 but differs in bfloat16 (by up to one bf16 step), where the checkpoints were
    trained and are served with this order.
    """

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def make_norm(spec: VisionTowerSpec) -> nn.Module:
    if spec.norm_type == "rms_norm":
        return RMSNorm(spec.hidden_size, eps=spec.layer_norm_eps)
    return nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)


def activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return nn.GELU(approximate="tanh")
    if name in ("silu", "swish"):
        return nn.SiLU()
    raise ValueError(f"unsupported vision activation {name!r}")


class Embeddings(nn.Module):
    def __init__(self, spec: VisionTowerSpec) -> None:
        super().__init__()
        width = spec.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, width))
        self.patch_embedding = nn.Conv2d(
            spec.num_channels, width, kernel_size=spec.patch_size, stride=spec.patch_size
        )
        self.position_embedding = nn.Parameter(torch.zeros(1, spec.patches_per_side**2 + 1, width))

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        # tiles: [n, 3, 448, 448] -> [n, 1 + 1024, width]
        patches = self.patch_embedding(tiles.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], -1, -1).to(patches.dtype)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.to(patches.dtype)


class Attention(nn.Module):
    def __init__(self, spec: VisionTowerSpec) -> None:
        super().__init__()
        self.num_heads = spec.num_heads
        self.head_dim = spec.hidden_size // spec.num_heads
        if self.head_dim * self.num_heads != spec.hidden_size:
            raise ValueError("vision hidden_size must be divisible by num_heads")
        self.qkv = nn.Linear(spec.hidden_size, 3 * spec.hidden_size, bias=spec.qkv_bias)
        self.qk_norm = spec.qk_norm
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.hidden_size, eps=spec.layer_norm_eps)
            self.k_norm = RMSNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.proj = nn.Linear(spec.hidden_size, spec.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, seq, width = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each [n, seq, width]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(n, seq, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # [n, heads, seq, head_dim]
        return self.proj(out.transpose(1, 2).reshape(n, seq, width))


class MLP(nn.Module):
    def __init__(self, spec: VisionTowerSpec) -> None:
        super().__init__()
        self.fc1 = nn.Linear(spec.hidden_size, spec.intermediate_size)
        self.act = activation(spec.hidden_act)
        self.fc2 = nn.Linear(spec.intermediate_size, spec.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, spec: VisionTowerSpec) -> None:
        super().__init__()
        self.norm1 = make_norm(spec)
        self.attn = Attention(spec)
        self.ls1 = nn.Parameter(torch.ones(spec.hidden_size))
        self.norm2 = make_norm(spec)
        self.mlp = MLP(spec)
        self.ls2 = nn.Parameter(torch.ones(spec.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class Encoder(nn.Module):
    def __init__(self, spec: VisionTowerSpec) -> None:
        super().__init__()
        # Layers past select_layer never influence the output: they are not built or loaded.
        self.layers = nn.ModuleList(EncoderLayer(spec) for _ in range(spec.layers_to_run))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class InternViT(nn.Module):
    """Tiles in, patch features out: ``[n, 3, 448, 448] -> [n, 1024, width]`` (CLS dropped)."""

    def __init__(self, spec: VisionTowerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embeddings = Embeddings(spec)
        self.encoder = Encoder(spec)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embeddings(tiles))
        return hidden[:, 1:, :]
