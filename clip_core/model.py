"""CLIP: a Vision Transformer or Modified ResNet image tower and a causal text Transformer.

Parameter names are OpenAI's (`visual.transformer.resblocks.0.attn.in_proj_weight`,
`ln_final`, `text_projection`, `logit_scale`, `visual.attnpool.*`), the interchange format
OpenCLIP also keeps, so state dicts move between the three without renaming.
Tensors are batch-first throughout.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import CLIPConfig

LOGIT_SCALE_MAX = 100.0


class LayerNorm(nn.LayerNorm):
    """LayerNorm that hands back its input's dtype (autocast would otherwise widen it to fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention` (fused kernels on GPU).

    Holds `in_proj_weight`/`in_proj_bias`/`out_proj` like `nn.MultiheadAttention`, so its
    parameters carry the names OpenAI's checkpoints use.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # nn.MultiheadAttention's initialisation, which the image tower keeps (OpenAI's and
        # OpenCLIP's init schemes reset only the text tower's blocks)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False, query_index: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention over `x` [batch, length, width]; with `query_index` [batch], only that
        position of each row queries (all positions still serve as keys and values)."""
        batch, length, width = x.shape
        head_width = width // self.heads
        if query_index is None:
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
            # shape = [3, batch, heads, length, head_width]
            q, k, v = qkv.view(batch, length, 3, self.heads, head_width).permute(2, 0, 3, 1, 4)
            x = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            return self.out_proj(x.transpose(1, 2).reshape(batch, length, width))
        w_q, w_kv = self.in_proj_weight.split([width, 2 * width])
        b_q, b_kv = self.in_proj_bias.split([width, 2 * width])
        query = x[torch.arange(batch, device=x.device), query_index].unsqueeze(1)
        q = F.linear(query, w_q, b_q).view(batch, 1, self.heads, head_width).transpose(1, 2)  # [*, heads, 1, hw]
        k, v = F.linear(x, w_kv, b_kv).view(batch, length, 2, self.heads, head_width).permute(2, 0, 3, 1, 4)
        mask = None
        if causal:  # the query sees its own position and those before it
            mask = (torch.arange(length, device=x.device) <= query_index[:, None])[:, None, None, :]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(x.transpose(1, 2).reshape(batch, 1, width))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, act_layer: type[nn.Module]):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", act_layer()),
                         ("c_proj", nn.Linear(hidden, width))])
        )

    def forward(self, x: torch.Tensor, causal: bool = False, query_index: torch.Tensor | None = None) -> torch.Tensor:
        attended = self.attn(self.ln_1(x), causal=causal, query_index=query_index)
        if query_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), query_index].unsqueeze(1)  # shape = [*, 1, width]
        x = x + attended
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act_layer: type[nn.Module]):
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, act_layer) for _ in range(layers)]
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, causal: bool = False, pool_index: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, length, width] → the same, or with `pool_index` [batch] only the output at that
        position, [batch, width]: the last block then computes nothing that cannot reach it."""
        last = len(self.resblocks) - 1
        for i, block in enumerate(self.resblocks):
            query_index = pool_index if i == last else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, query_index, use_reentrant=False)
            else:
                x = block(x, causal=causal, query_index=query_index)
        return x if pool_index is None else x[:, 0]

    def init_weights(self) -> None:
        # OpenAI's scheme: residual projections shrink with depth
        proj_std = self.width**-0.5 * (2 * len(self.resblocks)) ** -0.5
        attn_std = self.width**-0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 mlp_ratio: float, output_dim: int, act_layer: type[nn.Module]):
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        grid = image_size // patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act_layer)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor, patch_keep: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv1(x)  # shape = [*, width, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # shape = [*, grid ** 2, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # shape = [*, grid ** 2 + 1, width]
        if patch_keep is not None:  # patch dropout: the class token and the patches that patch_keep names
            kept = x[:, 1:].gather(1, patch_keep[..., None].expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :1], kept], dim=1)  # shape = [*, kept + 1, width]
        x = self.transformer(self.ln_pre(x), pool_index=torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        return self.ln_post(x) @ self.proj  # the class token's features

    def init_weights(self) -> None:
        """Nothing to redraw: as in OpenAI's model and OpenCLIP, the blocks keep the defaults they were
        built with (`Attention`'s and `nn.Linear`'s), the embeddings and projection their scaled normals."""


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        # every conv has stride 1; an avgpool before the last conv does the striding (anti-aliasing)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Pools a feature map with one attention query: the mean of the spatial positions."""

    def __init__(self, spatial_dim: int, embed_dim: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # shape = [*, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)  # [*, HW+1, C]
        batch, length, width = x.shape
        head_width = width // self.heads
        q = self.q_proj(x[:, :1]).view(batch, 1, self.heads, head_width).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.heads, head_width).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.heads, head_width).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v)  # shape = [*, heads, 1, head_width]
        return self.c_proj(x.transpose(1, 2).reshape(batch, width))


class ModifiedResNet(nn.Module):
    """ResNet with a 3-conv stem, anti-aliased strided convolutions and an attention-pooling head."""

    def __init__(self, layers: tuple[int, int, int, int], output_dim: int, heads: int, image_size: int, width: int):
        super().__init__()
        self.image_size = image_size
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(image_size // 32, width * 32, heads, output_dim)
        self.grad_checkpointing = False

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        modules = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        modules += [Bottleneck(self._inplanes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return self.attnpool(x)

    def init_weights(self) -> None:
        std = self.attnpool.c_proj.in_features**-0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        # each residual branch starts as the identity
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)


def require_patches(config: CLIPConfig) -> None:
    """Patch dropout drops patches of a Vision Transformer: refuse a model whose image tower is a ResNet."""
    if config.vision.is_resnet:
        raise ValueError(f"patch dropout needs a Vision Transformer; {config.name or 'this model'} has a "
                         "ResNet image tower: set patch_dropout to 0")


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        v, t = config.vision, config.text
        act_layer = QuickGELU if config.quick_gelu else nn.GELU
        if v.is_resnet:
            self.visual = ModifiedResNet(v.layers, config.embed_dim, v.heads, v.image_size, v.width)
        else:
            self.visual = VisionTransformer(v.image_size, v.patch_size, v.width, v.layers, v.heads,
                                            v.mlp_ratio, config.embed_dim, act_layer)
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, act_layer)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.ln_final = LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        if config.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(config.init_logit_bias)))
        else:
            self.logit_bias = None
        self._frozen_norms: list[nn.Module] = []
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.config.text.width**-0.5)
        self.transformer.init_weights()
        self.visual.init_weights()

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
        visual = self.visual
        (visual.transformer if hasattr(visual, "transformer") else visual).grad_checkpointing = enable

    def encode_image(self, image: torch.Tensor, normalize: bool = False,
                     patch_keep: torch.Tensor | None = None) -> torch.Tensor:
        """`patch_keep` [batch, kept] (from `sample_patches`): a ViT sees only those patches of each image."""
        if patch_keep is None:
            features = self.visual(image.to(self.dtype))
        else:
            require_patches(self.config)
            features = self.visual(image.to(self.dtype), patch_keep=patch_keep)
        return F.normalize(features, dim=-1) if normalize else features

    def sample_patches(self, batch: int, dropout: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Patch dropout (FLIP, Li et al. 2023; OpenCLIP's `patch_dropout`): for each of `batch` images
        the indices [batch, kept] of a random `1 - dropout` of its patches, drawn on the CPU. Training
        on them costs the vision tower about `1 - dropout` of its compute."""
        require_patches(self.config)
        patches = self.visual.positional_embedding.shape[0] - 1
        kept = max(1, int(patches * (1 - dropout)))
        return torch.rand(batch, patches, generator=generator).argsort(dim=1)[:, :kept]

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        # features are taken at [EOT], the highest token id in each row; under the causal mask,
        # positions after the batch's last [EOT] cannot reach it, so they are never computed,
        # and the last block computes only the [EOT] row. Under torch.compile the whole context is
        # computed: a length read from the data would break the graph and vary its shapes.
        eot = text.argmax(dim=-1)
        context = self.positional_embedding.shape[0]
        if text.shape[1] > context:  # prepared data holds 77 ids: cut as the tokenizer cuts, [EOT] kept last
            kept_eot = text.gather(1, eot[:, None]).squeeze(1)
            text = text[:, :context].clone()
            text[:, -1] = torch.where(eot >= context, kept_eot, text[:, -1])
            eot = text.argmax(dim=-1)
        length = text.shape[1] if torch.compiler.is_compiling() else int(eot.max()) + 1
        x = self.token_embedding(text[:, :length]) + self.positional_embedding[:length]  # shape = [*, length, width]
        x = self.ln_final(self.transformer(x, causal=True, pool_index=eot))  # shape = [*, width]
        features = x @ self.text_projection
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: torch.Tensor, text: torch.Tensor, patch_keep: torch.Tensor | None = None):
        """Normalized image and text features and the temperature, as OpenCLIP returns them."""
        image_features = self.encode_image(image, normalize=True, patch_keep=patch_keep)
        text_features = self.encode_text(text, normalize=True)
        # unclamped, as OpenAI's and OpenCLIP's: training clamps the parameter after each step
        # (clamp_logit_scale_); a clamp here as well would zero its gradient at the cap for good
        logit_scale = self.logit_scale.exp()
        if self.logit_bias is not None:
            return image_features, text_features, logit_scale, self.logit_bias
        return image_features, text_features, logit_scale

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Keep the temperature within [0, ln 100], as the paper does after each step."""
        self.logit_scale.clamp_(0, math.log(LOGIT_SCALE_MAX))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on "all weights that are not gains or biases" (the paper, §2.5; OpenCLIP's
        rule): weight matrices and embeddings decay; gains, biases, the class token and the temperature
        do not."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            exempt = param.ndim < 2 or "bias" in name or name.startswith("logit_") or ".bn" in name or "ln_" in name
            (no_decay if exempt else decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def lock_image_tower(self, unlocked_layers: int = 0) -> None:
        """Freeze the image tower (LiT), leaving its last `unlocked_layers` layer groups trainable, grouped as
        OpenCLIP's --lock-image-unlocked-groups: a ViT's stem, each block but the last, the last block with
        ln_post, the projection (1 unlocks the projection only); a ResNet's stem, each stage, the attention
        pool."""
        visual = self.visual
        if isinstance(visual, VisionTransformer):
            groups = _transformer_groups([visual.conv1, visual.class_embedding, visual.positional_embedding,
                                          visual.ln_pre], visual.transformer, visual.ln_post, visual.proj)
        else:
            groups = [[visual.conv1, visual.bn1, visual.conv2, visual.bn2, visual.conv3, visual.bn3],
                      [visual.layer1], [visual.layer2], [visual.layer3], [visual.layer4], [visual.attnpool]]
        self._freeze(_locked(groups, unlocked_layers, "image"))

    def lock_text_tower(self, unlocked_layers: int = 0) -> None:
        """Freeze the text tower, leaving its last `unlocked_layers` layer groups trainable, grouped as
        OpenCLIP's --lock-text-unlocked-layers: the embeddings, each block but the last, the last block with
        ln_final, the projection (1 unlocks the projection only)."""
        groups = _transformer_groups([self.token_embedding, self.positional_embedding], self.transformer,
                                     self.ln_final, self.text_projection)
        self._freeze(_locked(groups, unlocked_layers, "text"))

    def _freeze(self, groups: list[list]) -> None:
        for group in groups:
            for item in group:
                for param in [item] if isinstance(item, nn.Parameter) else item.parameters():
                    param.requires_grad_(False)
                if isinstance(item, nn.Module):
                    self._frozen_norms.extend(m for m in item.modules() if isinstance(m, nn.BatchNorm2d))
        self.train(self.training)

    def train(self, mode: bool = True):
        """As nn.Module.train, except that frozen BatchNorms keep their running statistics."""
        super().train(mode)
        for module in self._frozen_norms:
            module.eval()
        return self


def _transformer_groups(stem: list, transformer: Transformer, final_norm: nn.Module, projection) -> list[list]:
    """A transformer tower's lock groups, as OpenCLIP's: the stem, each block but the last, the last block
    with the final norm, the projection."""
    *blocks, last = transformer.resblocks
    return [stem, *[[block] for block in blocks], [last, final_norm], [projection]]


def _locked(groups: list[list], unlocked: int, tower: str) -> list[list]:
    """The groups a lock freezes: all but the last `unlocked` (stem, blocks..., head)."""
    if not 0 <= unlocked <= len(groups):
        raise ValueError(f"cannot leave {unlocked} layer groups of the {tower} tower unlocked: it has {len(groups)} "
                         f"(its stem, each block, its head); give 0-{len(groups)}")
    return groups[: len(groups) - unlocked]
