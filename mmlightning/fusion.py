"""Fusion heads: combine what a vision tower and a text tower return into one vector.

Every head takes ``(VisionOutput, TextOutput)`` and returns ``(B, output_dim)``, so any head
works with any encoder pair and a recipe swaps them with one word (``model.fusion.name``).
The framework passes whichever of the towers' widths a head's signature names
(``vision_dim``, ``vision_token_dim``, ``text_dim``, ``text_token_dim``); the recipe passes
the rest.

    concat          late fusion: MLP over [image; question]
    product         element-wise product of projected vectors
    bilinear        low-rank bilinear pooling (MLB: Kim et al. 2017)
    film            question-conditioned FiLM blocks over the visual grid (Perez et al. 2018)
    stacked_attention  question-guided glimpses over grid cells, each conditioned on the last
                    and reading out where it looked (SAN, Yang et al. 2016, with coordinates)
    co_attention    every word attends over grid cells and reads back what and where it found;
                    a GRU then reads the grounded question (ViLBERT's text-to-image direction)
    relation_network  an MLP over every pair of grid cells and the question, summed
                    (Santoro et al. 2017)
    single_stream   one transformer over grid tokens and word tokens (VisualBERT/UNITER style)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmlightning.encoders.outputs import TextOutput, VisionOutput
from mmlightning.errors import UserError
from mmlightning.registry import FUSION_HEADS


def mlp(in_dim: int, hidden_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim))


class QuestionReader(nn.Module):
    """A bidirectional GRU over the text tower's word tokens: one question vector that keeps
    word order. A tower's pooled vector can blur it: under the clip-shapes text tower, "is the
    cross left of the circle" and "is the circle left of the cross" pool to vectors with cosine
    0.999, and a head reading only those answers relational questions at chance."""

    def __init__(self, text_token_dim: int, question_dim: int) -> None:
        super().__init__()
        if question_dim % 2:
            raise UserError(f"question_dim must be even (two GRU directions), got {question_dim}")
        self.output_dim = question_dim
        self.forward_gru = nn.GRU(text_token_dim, question_dim // 2, batch_first=True)
        self.backward_gru = nn.GRU(text_token_dim, question_dim // 2, batch_first=True)

    def forward(self, text: TextOutput) -> torch.Tensor:
        # The final state of each direction over each question's own words. Instead of packing
        # (which needs the lengths on the CPU: a host sync per step), the backward direction
        # reads every question reversed within its length, and both read their output at the
        # last word; padding comes after the words, so it never reaches those outputs.
        lengths = text.mask.sum(dim=1).clamp(min=1)  # (B,)
        positions = torch.arange(text.tokens.shape[1], device=lengths.device)
        reverse = (lengths[:, None] - 1 - positions).clamp(min=0)  # (B, T): word t <- word len-1-t
        last = (lengths - 1)[:, None, None].expand(-1, 1, self.forward_gru.hidden_size)
        # fp32 whatever the autocast: cuDNN's RNN autocast casts to fp16 even under bf16-mixed
        with torch.autocast(text.tokens.device.type, enabled=False):
            tokens = text.tokens.float()
            backwards = tokens.gather(1, reverse[:, :, None].expand_as(tokens))
            forward_states, _ = self.forward_gru(tokens)
            backward_states, _ = self.backward_gru(backwards)
        return torch.cat([forward_states.gather(1, last), backward_states.gather(1, last)], dim=-1).squeeze(1)


@FUSION_HEADS.register("concat")
class ConcatFusion(nn.Module):
    """Late fusion: the pooled vectors side by side through an MLP. Blind to where things are
    unless the pooled image vector kept it."""

    def __init__(self, vision_dim: int, text_token_dim: int, question_dim: int = 256, hidden_dim: int = 512,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.output_dim = hidden_dim
        self.question = QuestionReader(text_token_dim, question_dim)
        self.net = nn.Sequential(mlp(vision_dim + question_dim, hidden_dim, hidden_dim, dropout), nn.GELU())

    def forward(self, vision: VisionOutput, text: TextOutput) -> torch.Tensor:
        return self.net(torch.cat([vision.pooled, self.question(text)], dim=-1))


@FUSION_HEADS.register("product")
class ProductFusion(nn.Module):
    """Both vectors projected to one width and multiplied element-wise (as in the VQA
    baseline of Antol et al.): the question gates image features."""

    def __init__(self, vision_dim: int, text_token_dim: int, question_dim: int = 256, hidden_dim: int = 512,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.output_dim = hidden_dim
        self.image = nn.Sequential(nn.Linear(vision_dim, hidden_dim), nn.GELU())
        self.question = nn.Sequential(QuestionReader(text_token_dim, question_dim), nn.Linear(question_dim, hidden_dim),
                                      nn.GELU())
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim), nn.GELU())

    def forward(self, vision: VisionOutput, text: TextOutput) -> torch.Tensor:
        return self.out(self.image(vision.pooled) * self.question(text))


@FUSION_HEADS.register("bilinear")
class LowRankBilinearFusion(nn.Module):
    """Low-rank bilinear pooling: z_k = sum_r P_kr tanh(U_r v) tanh(V_r q). A full bilinear map
    would need vision_dim x question_dim x output_dim weights; rank r keeps the interaction
    multiplicative at (vision_dim + question_dim + output_dim) x r."""

    def __init__(self, vision_dim: int, text_token_dim: int, question_dim: int = 256, rank: int = 1024,
                 hidden_dim: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        self.output_dim = hidden_dim
        self.u = nn.Linear(vision_dim, rank)
        self.question = QuestionReader(text_token_dim, question_dim)
        self.v = nn.Linear(question_dim, rank)
        self.dropout = nn.Dropout(dropout)
        self.p = nn.Linear(rank, hidden_dim)

    def forward(self, vision: VisionOutput, text: TextOutput) -> torch.Tensor:
        joint = torch.tanh(self.u(vision.pooled)) * torch.tanh(self.v(self.question(text)))
        return F.gelu(self.p(self.dropout(joint)))


class FiLMBlock(nn.Module):
    """Residual block whose normalised activations are scaled and shifted by the question:
    conv1x1 -> ReLU -> conv3x3 -> BN (no affine) -> gamma * x + beta -> ReLU, plus the input.

    The 1x1 conv sees each cell's features, its (x, y), and, with ``directional``, the max of
    the features strictly to its left, right, above and below: one step tells every cell what
    lies on each side of it, where stacked 3x3 convs need a block per cell of distance
    (directional context as in Inside-Outside Net, Bell et al. 2016)."""

    def __init__(self, channels: int, directional: bool = True) -> None:
        super().__init__()
        self.directional = directional
        inputs = channels * (5 if directional else 1) + 2
        self.conv1 = nn.Conv2d(inputs, channels, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(channels, affine=False)

    def forward(self, x: torch.Tensor, coords: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        context = [x, *directional_max(x)] if self.directional else [x]
        h = F.relu(self.conv1(torch.cat([*context, coords], dim=1)))
        h = self.norm(self.conv2(h))
        h = F.relu(gamma[:, :, None, None] * h + beta[:, :, None, None])
        return x + h


def directional_max(x: torch.Tensor) -> list[torch.Tensor]:
    """For (B, C, H, W) features >= 0: the running max over cells strictly left of, right of,
    above and below each cell (0 where there are none)."""
    out = []
    for dim in (3, 2):  # width: left / right; height: above / below
        for reverse in (False, True):
            t = x.flip(dim) if reverse else x
            t = t.cummax(dim=dim).values.roll(1, dims=dim)  # the max over cells strictly before
            t.select(dim, 0).zero_()
            out.append(t.flip(dim) if reverse else t)
    return out


@FUSION_HEADS.register("film")
class FiLMFusion(nn.Module):
    """FiLM: the question predicts a scale and shift for every channel of every block, which
    run over the visual grid. Coordinate maps let the blocks compare positions, which is what
    "left of" questions need and what pooled-vector fusion loses."""

    def __init__(self, vision_token_dim: int, text_token_dim: int, question_dim: int = 256, channels: int = 128,
                 blocks: int = 4, directional: bool = True, hidden_dim: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        self.output_dim = hidden_dim
        self.stem = nn.Sequential(nn.Conv2d(vision_token_dim + 2, channels, 3, padding=1), nn.BatchNorm2d(channels),
                                  nn.ReLU())
        self.blocks = nn.ModuleList(FiLMBlock(channels, directional) for _ in range(blocks))
        self.question = QuestionReader(text_token_dim, question_dim)
        self.film = nn.Linear(question_dim, 2 * channels * blocks)  # (gamma, beta) per block and channel
        self.head = nn.Sequential(nn.Conv2d(channels + 2, 512, 1), nn.BatchNorm2d(512), nn.ReLU())
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(512, hidden_dim), nn.GELU())

    def forward(self, vision: VisionOutput, text: TextOutput) -> torch.Tensor:
        grid = tokens_to_grid(vision.tokens)  # (B, C, h, w)
        coords = coordinate_maps(grid)
        x = self.stem(torch.cat([grid, coords], dim=1))
        params = self.film(self.question(text)).view(len(x), len(self.blocks), 2, -1)
        for i, block in enumerate(self.blocks):
            x = block(x, coords, 1 + params[:, i, 0], params[:, i, 1])  # gamma around 1 at init
        x = self.head(torch.cat([x, coords], dim=1))
        return self.out(x.amax(dim=(2, 3)))  # global max pool, as in the FiLM paper


def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, C) tokens of a square grid -> (B, C, h, w). ViT tokens with a class token
    (N = 1 + h*w) drop it."""
    b, n, c = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        side = math.isqrt(n - 1)
        if side * side != n - 1:
            raise UserError(f"fusion head needs a square grid of visual tokens, got {n} tokens")
        tokens = tokens[:, 1:]
    return tokens.transpose(1, 2).reshape(b, c, side, side)


def coordinate_maps(grid: torch.Tensor) -> torch.Tensor:
    """(B, 2, h, w): x and y in [-1, 1], the CoordConv trick."""
    b, _, h, w = grid.shape
    ys = torch.linspace(-1, 1, h, device=grid.device, dtype=grid.dtype)
    xs = torch.linspace(-1, 1, w, device=grid.device, dtype=grid.dtype)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy]).expand(b, 2, h, w)


@FUSION_HEADS.register("stacked_attention")
class StackedAttentionFusion(nn.Module):
    """Glimpses. Each glimpse first reads the question, attending over its words (so one
    glimpse can take "the red circle" and the next "the square"), then scores every grid cell
    against what it read, and reads out the attended features *and the attended (x, y)*. Each
    glimpse is conditioned on the previous ones and sees every cell's position relative to the
    last, so "the object left of the square" is: find the square, then look left of it. The
    answer MLP compares the glimpses' coordinates directly, which is what relational
    questions need and what pooled vectors lose. (SAN, Yang et al. 2016, with MAC-style word
    attention, Hudson & Manning 2018.)"""

    def __init__(self, vision_token_dim: int, text_token_dim: int, question_dim: int = 256, glimpses: int = 3,
                 attention_dim: int = 256, hidden_dim: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        self.output_dim = hidden_dim
        self.glimpses = glimpses
        cell_dim = vision_token_dim + 2  # features + absolute (x, y)
        self.cells = nn.Linear(cell_dim, attention_dim)
        self.relative = nn.Linear(2, attention_dim, bias=False)  # cell position relative to the last glimpse
        self.words = nn.Linear(text_token_dim, attention_dim)
        self.question = QuestionReader(text_token_dim, question_dim)
        self.word_queries = nn.ModuleList(nn.Linear(question_dim + cell_dim * g, attention_dim)
                                          for g in range(glimpses))
        self.word_scores = nn.ModuleList(nn.Linear(attention_dim, 1) for _ in range(glimpses))
        self.cell_queries = nn.ModuleList(nn.Linear(text_token_dim + cell_dim * g, attention_dim)
                                          for g in range(glimpses))
        self.cell_scores = nn.ModuleList(nn.Linear(attention_dim, 1) for _ in range(glimpses))
        self.out = nn.Sequential(nn.Dropout(dropout), mlp(question_dim + cell_dim * glimpses, hidden_dim, hidden_dim,
                                                          dropout), nn.GELU())

    def forward(self, vision: VisionOutput, text: TextOutput) -> torch.Tensor:
        grid = tokens_to_grid(vision.tokens)
        xy = coordinate_maps(grid).flatten(2).transpose(1, 2)  # (B, N, 2)
        cells = torch.cat([grid.flatten(2).transpose(1, 2), xy], dim=-1)  # (B, N, C+2)
        cell_keys, word_keys = self.cells(cells), self.words(text.tokens)
        padding = ~text.mask[:, :, None]  # (B, T, 1)
        question = self.question(text)
        read: list[torch.Tensor] = []
        where = torch.zeros_like(xy[:, :1])  # (B, 1, 2) the last glimpse's position
        for g in range(self.glimpses):
            # which words this glimpse is about
            query = self.word_queries[g](torch.cat([question, *read], dim=-1))[:, None]
            word_weights = self.word_scores[g](torch.tanh(word_keys + query)).masked_fill(padding, float("-inf"))
            words = (word_weights.softmax(dim=1) * text.tokens).sum(dim=1)  # (B, Dt)
            # where in the image they are
            query = self.cell_queries[g](torch.cat([words, *read], dim=-1))[:, None]
            hidden = torch.tanh(cell_keys + query + (self.relative(xy - where) if g else 0))
            attention = self.cell_scores[g](hidden).softmax(dim=1)  # (B, N, 1) over cells
            glimpse = (attention * cells).sum(dim=1)  # (B, C+2): features and where they are
            read.append(glimpse)
            where = glimpse[:, None, -2:]
        return self.out(torch.cat([question, *read], dim=-1))


@FUSION_HEADS.register("co_attention")
class CoAttentionFusion(nn.Module):
    """Words look at the image. Each word token (with its context from the text tower) attends
    over the grid cells and reads back the attended features and the attended (x, y); a
    bidirectional GRU then reads the question word by word with what each word found, so
    "is the cross left of the circle" becomes a comparison of the x the word "cross" found
    with the x the word "circle" found. Grounding a word is learnt from every question that
    names an object, not only from relational ones."""

    def __init__(self, vision_dim: int, vision_token_dim: int, text_token_dim: int, width: int = 128, heads: int = 4,
                 question_dim: int = 256, hidden_dim: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        self.output_dim = hidden_dim
        self.words = nn.Linear(text_token_dim, width)
        self.cells = nn.Linear(vision_token_dim + 2, width)
        # no dropout inside: the weights it returns are also where each word looked
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.reader = QuestionReader(text_token_dim + width + 2, question_dim)
        self.out = nn.Sequential(mlp(question_dim + vision_dim, hidden_dim, hidden_dim, dropout), nn.GELU())

    def forward(self, vision: VisionOutput, text: TextOutput) -> torch.Tensor:
        grid = tokens_to_grid(vision.tokens)
        xy = coordinate_maps(grid).flatten(2).transpose(1, 2)  # (B, N, 2)
        cells = self.cells(torch.cat([grid.flatten(2).transpose(1, 2), xy], dim=-1))
        found, weights = self.attention(self.words(text.tokens), cells, cells, need_weights=True)  # (B,T,W), (B,T,N)
        grounded = torch.cat([text.tokens, self.dropout(found), weights @ xy.to(weights.dtype)], dim=-1)  # what each word is, saw, and where
        question = self.reader(TextOutput(pooled=text.pooled, tokens=grounded, mask=text.mask))
        return self.out(torch.cat([question, vision.pooled], dim=-1))


@FUSION_HEADS.register("relation_network")
class RelationNetworkFusion(nn.Module):
    """Relation Network: g(cell_i, cell_j, question) for every ordered pair of grid cells
    (features plus (x, y)), averaged, then an MLP. A pair is the unit a relation is about, so
    "is A left of B" is one pair whose cells match A and B and whose x's are in order.
    ``pool`` max-pools the grid first: N cells cost N^2 pairs (8x8 -> 4096, 4x4 -> 256)."""

    def __init__(self, vision_token_dim: int, text_token_dim: int, question_dim: int = 256, pool: int = 2,
                 pair_dim: int = 128, pair_layers: int = 3, hidden_dim: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        self.output_dim, self.pool = hidden_dim, pool
        self.question = QuestionReader(text_token_dim, question_dim)
        cell_dim = vision_token_dim + 2
        # the first layer of g on [cell_i; cell_j; q] is a sum of three linear maps: computing
        # them once per cell instead of once per pair saves N x the work
        self.first_i = nn.Linear(cell_dim, pair_dim)
        self.first_j = nn.Linear(cell_dim, pair_dim, bias=False)
        self.first_q = nn.Linear(question_dim, pair_dim, bias=False)
        layers: list[nn.Module] = []
        for _ in range(pair_layers - 1):
            layers += [nn.ReLU(), nn.Linear(pair_dim, pair_dim)]
        self.pair = nn.Sequential(*layers, nn.ReLU())
        self.out = nn.Sequential(mlp(pair_dim, hidden_dim, hidden_dim, dropout), nn.GELU())

    def forward(self, vision: VisionOutput, text: TextOutput) -> torch.Tensor:
        grid = tokens_to_grid(vision.tokens)
        if self.pool > 1:
            grid = F.max_pool2d(grid, self.pool)
        cells = torch.cat([grid, coordinate_maps(grid)], dim=1).flatten(2).transpose(1, 2)  # (B, N, C+2)
        first = (self.first_i(cells)[:, :, None] + self.first_j(cells)[:, None, :]
                 + self.first_q(self.question(text))[:, None, None])  # (B, N, N, P)
        return self.out(self.pair(first).mean(dim=(1, 2)))


@FUSION_HEADS.register("single_stream")
class SingleStreamFusion(nn.Module):
    """One transformer over [CLS] + visual tokens + word tokens, each with a learned type
    embedding and the cells with their (x, y) (VisualBERT/UNITER style): every word attends to
    every grid cell and back.
    The output is the [CLS] position."""

    def __init__(self, vision_token_dim: int, text_token_dim: int, width: int = 256, layers: int = 2,
                 heads: int = 4, hidden_dim: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        self.output_dim, self.width = hidden_dim, width
        self.vision_in = nn.Linear(vision_token_dim, width)
        self.location_in = nn.Linear(2, width)  # each cell's (x, y), as UNITER embeds box coordinates
        self.text_in = nn.Linear(text_token_dim, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.type_embed = nn.Parameter(torch.zeros(3, width))  # cls, vision, text
        nn.init.trunc_normal_(self.cls, std=0.02)
        nn.init.trunc_normal_(self.type_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Sequential(nn.Linear(width, hidden_dim), nn.GELU())

    def encode(self, vision: VisionOutput, text: TextOutput, use_image: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(the fused [CLS] vector (B, output_dim), each word's fused state (B, T, width)):
        what pretraining reads (image-text matching, masked words). ``use_image=False`` hides
        every grid cell from the words (what MLM gets right without the image)."""
        tokens = vision.tokens
        if math.isqrt(tokens.shape[1] - 1) ** 2 == tokens.shape[1] - 1:  # ViT: drop the class token
            tokens = tokens[:, 1:]
        xy = coordinate_maps(tokens_to_grid(tokens)).flatten(2).transpose(1, 2)
        v = self.vision_in(tokens) + self.location_in(xy) + self.type_embed[1]
        t = self.text_in(text.tokens) + self.type_embed[2]
        cls = self.cls.expand(len(v), -1, -1) + self.type_embed[0]
        x = torch.cat([cls, v, t], dim=1)
        real = torch.full((len(v), 1 + v.shape[1]), True, device=v.device)
        real[:, 1:] = use_image
        padding = ~torch.cat([real, text.mask.bool()], dim=1)
        x = self.norm(self.transformer(x, src_key_padding_mask=padding))
        return self.out(x[:, 0]), x[:, 1 + v.shape[1]:]

    def forward(self, vision: VisionOutput, text: TextOutput) -> torch.Tensor:
        return self.encode(vision, text)[0]
