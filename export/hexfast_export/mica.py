"""MICA: MCAT-style co-attention survival model over H&E tiles and CODEX channels.

Inputs are one slide's bags: `h_path` [N, 1024] (tile features) and
`h_codex` [40, 384] (one DINOv2 feature per virtual CODEX channel).
State-dict keys follow the reference `MCAT_Surv` (lilab-stanford/HEX,
mica/models/model_coattn.py): `wsi_net.0`, `codex_net.0`, `coattn.{in_proj_weight,
in_proj_bias,out_proj}`, `{path,codex}_transformer.layers.{0,1}.{self_attn,
linear1,linear2,norm1,norm2}`, `{path,codex}_attention_head.{attention_a.0,
attention_b.0,attention_c}`, `{path,codex}_rho.0`, `mm.*`, `classifier`.

Forward (eval mode; every Dropout is the identity):

1. `wsi_net` Linear(1024,256)-ReLU, `codex_net` Linear(384,256)-ReLU.
2. co-attention, one head, query = the 40 CODEX tokens, key = value = the N
   H&E tokens: scores = (Wq c)(Wk p)^T / sqrt(256) [40, N],
   out = out_proj(softmax_N(scores) (Wv p)) [40, 256].
3. `path_transformer` over those 40 co-attended tokens, `codex_transformer`
   over the 40 CODEX tokens: 2 post-norm layers each (nn.TransformerEncoderLayer
   defaults: d 256, 8 heads, FFN 512, ReLU, LayerNorm eps 1e-5).
4. pooling: 'gap' = mean over the 40 tokens (no rho); 'attn' = gated attention
   a = attention_c(tanh(attention_a x) * sigmoid(attention_b x)) [40,1],
   h = rho(softmax_40(a)^T x).
5. fusion: 'concat' = mm(cat(h_path, h_codex)) with mm = Linear(512,256)-ReLU-
   Linear(256,256)-ReLU; 'bilinear' = BilinearFusion(256, 256, scale 8, 8,
   mmhid 256) (gated units, outer product of [o1,1]x[o2,1]).
6. logits = classifier(h) [1,4]; hazards = sigmoid; S = cumprod(1 - hazards);
   risk = -sum(S).

transformer_mode 'shared' aliases codex_transformer / codex_attention_head /
codex_rho to the path ones (the reference does the same, so a shared
checkpoint holds both key sets with equal tensors).

Streaming (`forward_chunk`, what the ONNX file computes): step 2's softmax over
the N tiles is carried across chunks of tiles as an online softmax (running
log-sum-exp and weighted mean), so a slide's features are read in chunks and
never held whole; after the last chunk the outputs equal forward()'s up to
float rounding (tests).

Outputs (`MicaOutput`): hazards [1,4], survival [1,4], risk [1],
coattn [40, N] (softmax weights of each CODEX channel over the tiles; rows sum
to 1), coattn_scores [40, N] (the raw scaled scores before the softmax: what
the reference returns as attention_scores['coattn'], there shaped [1,1,40,N]),
path_attention / codex_attention [1, 40] (raw gated-attention logits, as the
reference returns them; zeros in 'gap' mode where the reference returns None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

FUSIONS = ("concat", "bilinear")
POOLINGS = ("gap", "attn")
TRANSFORMER_MODES = ("separate", "shared")


@dataclass(frozen=True)
class MicaConfig:
    fusion: str = "concat"
    pooling: str = "attn"
    transformer_mode: str = "separate"
    path_dim: int = 1024
    codex_dim: int = 384
    dim: int = 256
    n_classes: int = 4
    transformer_heads: int = 8
    transformer_ffn: int = 512
    transformer_layers: int = 2
    dropout: float = 0.25

    def __post_init__(self):
        for name, value, allowed in (("fusion", self.fusion, FUSIONS), ("pooling", self.pooling, POOLINGS),
                                     ("transformer_mode", self.transformer_mode, TRANSFORMER_MODES)):
            if value not in allowed:
                raise ValueError(f"MICA {name} must be one of {', '.join(allowed)}, not {value!r}")


class MicaOutput(NamedTuple):
    hazards: torch.Tensor  # [1, n_classes]
    survival: torch.Tensor  # [1, n_classes]
    risk: torch.Tensor  # [1]
    coattn: torch.Tensor  # [n_codex, N] softmax over tiles
    coattn_scores: torch.Tensor  # [n_codex, N] pre-softmax
    path_attention: torch.Tensor  # [1, n_codex]
    codex_attention: torch.Tensor  # [1, n_codex]


class MultiheadAttention(nn.Module):
    """nn.MultiheadAttention's parameter layout (packed in_proj) on [S, E] inputs (batch of one).

    Returns the output and the per-head pre-softmax scores [heads, L, S]."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        d = query.shape[-1]
        hd = d // self.heads
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q = F.linear(query, wq, bq) * hd ** -0.5
        k = F.linear(key, wk, bk)
        v = F.linear(value, wv, bv)
        q = q.view(-1, self.heads, hd).transpose(0, 1)  # [H, L, hd]
        k = k.view(-1, self.heads, hd).transpose(0, 1)  # [H, S, hd]
        v = v.view(-1, self.heads, hd).transpose(0, 1)
        scores = q @ k.transpose(1, 2)  # [H, L, S]
        out = (scores.softmax(dim=-1) @ v).transpose(0, 1).reshape(-1, d)
        return self.out_proj(out), scores


class TransformerEncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer (post-norm, ReLU) with its parameter names."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, heads)
        self.linear1 = nn.Linear(dim, ffn)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, x, x)[0])
        return self.norm2(x + self.linear2(self.dropout(F.relu(self.linear1(x)))))


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: MicaConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(cfg.dim, cfg.transformer_heads, cfg.transformer_ffn, cfg.dropout)
            for _ in range(cfg.transformer_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class GatedAttention(nn.Module):
    """Attn_Net_Gated(L, D, dropout, n_classes=1): keys attention_a.0, attention_b.0, attention_c."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_c = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention_c(self.attention_a(x) * self.attention_b(x))  # [T, 1]


class BilinearFusion(nn.Module):
    """Gated bilinear fusion (PORPOISE/MCAT), skip=0, use_bilinear=0, gate1=gate2=1."""

    def __init__(self, dim1: int = 256, dim2: int = 256, scale_dim1: int = 8, scale_dim2: int = 8,
                 mmhid: int = 256, dropout: float = 0.25):
        super().__init__()
        d1, d2 = dim1 // scale_dim1, dim2 // scale_dim2
        self.linear_h1 = nn.Sequential(nn.Linear(dim1, d1), nn.ReLU())
        self.linear_z1 = nn.Sequential(nn.Linear(dim1 + dim2, d1))
        self.linear_o1 = nn.Sequential(nn.Linear(d1, d1), nn.ReLU(), nn.Dropout(dropout))
        self.linear_h2 = nn.Sequential(nn.Linear(dim2, d2), nn.ReLU())
        self.linear_z2 = nn.Sequential(nn.Linear(dim1 + dim2, d2))
        self.linear_o2 = nn.Sequential(nn.Linear(d2, d2), nn.ReLU(), nn.Dropout(dropout))
        self.post_fusion_dropout = nn.Dropout(dropout)
        self.encoder1 = nn.Sequential(nn.Linear((d1 + 1) * (d2 + 1), 256), nn.ReLU(), nn.Dropout(dropout))
        self.encoder2 = nn.Sequential(nn.Linear(256, mmhid), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, vec1: torch.Tensor, vec2: torch.Tensor) -> torch.Tensor:
        """vec1, vec2: [B, dim] → [B, mmhid]."""
        both = torch.cat((vec1, vec2), dim=1)
        o1 = self.linear_o1(torch.sigmoid(self.linear_z1(both)) * self.linear_h1(vec1))
        o2 = self.linear_o2(torch.sigmoid(self.linear_z2(both)) * self.linear_h2(vec2))
        one = torch.ones_like(o1[:, :1])
        o1 = torch.cat((o1, one), dim=1)
        o2 = torch.cat((o2, one), dim=1)
        o12 = (o1.unsqueeze(2) * o2.unsqueeze(1)).flatten(start_dim=1)
        return self.encoder2(self.encoder1(self.post_fusion_dropout(o12)))


class Mica(nn.Module):
    def __init__(self, cfg: MicaConfig = MicaConfig()):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.wsi_net = nn.Sequential(nn.Linear(cfg.path_dim, d), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.codex_net = nn.Sequential(nn.Linear(cfg.codex_dim, d), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.coattn = MultiheadAttention(d, heads=1)  # its weights; forward() computes the one head itself
        self.accumulate = OnlineSoftmax()
        self.path_transformer = TransformerEncoder(cfg)
        self.path_attention_head = GatedAttention(d, d, cfg.dropout)
        self.path_rho = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(cfg.dropout))
        if cfg.transformer_mode == "shared":
            self.codex_transformer = self.path_transformer
            self.codex_attention_head = self.path_attention_head
            self.codex_rho = self.path_rho
        else:
            self.codex_transformer = TransformerEncoder(cfg)
            self.codex_attention_head = GatedAttention(d, d, cfg.dropout)
            self.codex_rho = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(cfg.dropout))
        if cfg.fusion == "concat":
            self.mm = nn.Sequential(nn.Linear(2 * d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU())
        else:
            self.mm = BilinearFusion(d, d, 8, 8, mmhid=d, dropout=cfg.dropout)
        self.classifier = nn.Linear(d, cfg.n_classes)

    def unused_keys(self) -> set[str]:
        """State-dict keys this configuration's forward never reads ('gap' skips attention heads and rho)."""
        if self.cfg.pooling == "attn":
            return set()
        prefixes = ("path_attention_head.", "path_rho.", "codex_attention_head.", "codex_rho.")
        return {k for k in self.state_dict() if k.startswith(prefixes)}

    def _pool(self, tokens: torch.Tensor, head: GatedAttention, rho: nn.Module):
        if self.cfg.pooling == "gap":
            return tokens.mean(dim=0), tokens.new_zeros(1, tokens.shape[0])
        a = head(tokens).transpose(0, 1)  # [1, T]
        return rho(a.softmax(dim=1) @ tokens)[0], a

    def codex_query(self, h_codex: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CODEX tokens c [40, d] and the co-attention queries, already scaled by 1/sqrt(d)."""
        c = self.codex_net(h_codex)
        wq, bq = self.coattn.in_proj_weight.chunk(3)[0], self.coattn.in_proj_bias.chunk(3)[0]
        return c, F.linear(c, wq, bq) * c.shape[-1] ** -0.5

    def tile_keys_values(self, h_path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Co-attention keys and values [N, d] of the H&E tiles (each tile on its own)."""
        p = self.wsi_net(h_path)
        _, wk, wv = self.coattn.in_proj_weight.chunk(3)
        _, bk, bv = self.coattn.in_proj_bias.chunk(3)
        return F.linear(p, wk, bk), F.linear(p, wv, bv)

    def head(self, c: torch.Tensor, attended: torch.Tensor):
        """From the CODEX tokens and the co-attention's softmax-weighted values [40, d]
        to (hazards, survival, risk, path_attention, codex_attention)."""
        p_co = self.coattn.out_proj(attended)
        h_p, a_p = self._pool(self.path_transformer(p_co), self.path_attention_head, self.path_rho)
        h_c, a_c = self._pool(self.codex_transformer(c), self.codex_attention_head, self.codex_rho)
        if self.cfg.fusion == "concat":
            h = self.mm(torch.cat((h_p, h_c), dim=0))
        else:
            h = self.mm(h_p.unsqueeze(0), h_c.unsqueeze(0))[0]
        logits = self.classifier(h).unsqueeze(0)  # [1, n_classes]
        hazards = torch.sigmoid(logits)
        survival = survival_curve(hazards)
        return hazards, survival, -survival.sum(dim=1), a_p, a_c

    def forward(self, h_path: torch.Tensor, h_codex: torch.Tensor) -> MicaOutput:
        c, q = self.codex_query(h_codex)
        k, v = self.tile_keys_values(h_path)
        scores = q @ k.transpose(0, 1)  # [40, N]
        weights = scores.softmax(dim=-1)
        hazards, survival, risk, a_p, a_c = self.head(c, weights @ v)
        return MicaOutput(hazards, survival, risk, weights, scores, a_p, a_c)

    def forward_chunk(self, h_path: torch.Tensor, h_codex: torch.Tensor, lse: torch.Tensor, mean: torch.Tensor):
        """One chunk of a slide's tiles, carrying the co-attention's softmax as a running state.

        lse [40]: log-sum-exp of the scores seen so far (hexfast.score.mica_stream.INITIAL_LSE before the first chunk);
        mean [40, d]: softmax-weighted mean of their values (zeros before the first chunk).
        Returns (hazards, survival, risk, scores [40, n], lse, mean): after the last chunk the
        first three are forward()'s, and exp(scores - lse) are its coattn columns."""
        c, q = self.codex_query(h_codex)
        k, v = self.tile_keys_values(h_path)
        scores = q @ k.transpose(0, 1)  # [40, n]
        lse, mean = self.accumulate(scores, v, lse, mean)
        hazards, survival, risk, _, _ = self.head(c, mean)
        return hazards, survival, risk, scores, lse, mean


class OnlineSoftmax(nn.Module):
    """softmax(scores) @ values over tiles that arrive in chunks (Milakov & Gimelshein's online softmax).

    The state is scale-free (a log-sum-exp and a weighted mean), so it neither overflows with the
    tile count nor depends on the chunking beyond rounding."""

    def forward(self, scores: torch.Tensor, values: torch.Tensor, lse: torch.Tensor, mean: torch.Tensor):
        top = torch.maximum(lse, scores.max(dim=1).values)  # [40]
        old = torch.exp(lse - top)  # weight of the tiles before this chunk, relative to exp(top)
        e = torch.exp(scores - top[:, None])  # [40, n]
        total = old + e.sum(dim=1)
        mean = (mean * old[:, None] + e @ values) / total[:, None]
        return top + torch.log(total), mean


def survival_curve(hazards: torch.Tensor) -> torch.Tensor:
    """S = cumprod(1 - hazards) along the classes, written as a product chain: ONNX has no CumProd;
    the classes are few and the multiplications happen in cumprod's order, so the values are the same."""
    keep = 1 - hazards
    columns = [keep[:, :1]]
    for k in range(1, keep.shape[1]):
        columns.append(columns[-1] * keep[:, k:k + 1])
    return torch.cat(columns, dim=1)
