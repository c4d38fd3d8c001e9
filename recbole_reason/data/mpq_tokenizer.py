"""REG4Rec's MPQ tokenizer data module: every item -> M unordered semantic tokens, one per parallel codebook.

Paper: REG4Rec (arXiv 2508.15308), section "MoE-based Parallel Quantization" (MPQ); spec ../shared/specs/reg4rec.md §2.
Pipeline (`build_item_tokens`):
  1. item input vectors v_i (`item_input_vectors`): by default (`item_feature_source: cf`) the item embeddings of a
     SASRec-style model trained on the training split only, to early stopping on held-out last training items
     (`pretrain_cf_item_embeddings`): collaborative codes. `features`: multi-hot item features (ml-100k title words /
     year / genres, Amazon attributes) reduced by truncated SVD (on Amazon most items share their attribute set
     with another item, so most codes would collide and be handed out near-arbitrarily); `features+cf` both;
  2. `MPQ`: M expert encoders with their own codebooks, a router mixing the quantised vectors, one shared decoder;
     loss = reconstruction + VQ/commitment + orthogonality + balance (`MPQ.losses`), k-means init, dead-code re-seeding;
  3. `resolve_collisions`: every token tuple maps to exactly one item (nearest unused tuple, no ordered collision token);
  4. categories (real ones from `item_features.item_categories`, else k-means on v_i) and the token -> category table;
  5. on-disk cache keyed by dataset + tokenizer settings. The cache file also stores its format version, the dataset
     fingerprint and the settings: a file that does not match all three (copied from another dataset or setting under
     the same name, or unreadable) is stale and rebuilt, never used. The finished cache is written atomically.
Everything random is drawn inside `torch.random.fork_rng` seeded from config['seed']: the tokens are the same whether
they come from the cache or are rebuilt, and the global RNG that RecBole seeded is left untouched.

Resume (`TokenizerProgress`): after every epoch of the pretrained ID model and of MPQ, the weights, the optimizer,
the epoch and the RNG state are saved in `<cache file>.partial` next to the cache. A build interrupted mid-way
continues from there and yields exactly the table of an uninterrupted build with the same seed; the partial file is
deleted once the cache is written.
"""

import hashlib
import heapq
import json
import os
from dataclasses import dataclass, field
from logging import getLogger

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from recbole_reason.compat import load_checkpoint
from recbole_reason.data.item_features import item_attributes, item_categories, missing_item_features

CACHE_VERSION = 2  # 2: early-stopped ID model (mpq_cf_patience, mpq_cf_layers), coherence in the stats
FEATURE_SOURCES = ("auto", "features", "cf", "features+cf")


# ---------------------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TokenizerSettings:
    num_codebooks: int  # M
    codebook_size: int  # D
    max_codebooks: int
    latent_dim: int
    hidden_dim: int
    input_dim: int  # SVD size of the feature vectors
    epochs: int
    learning_rate: float
    batch_size: int
    beta: float  # commitment weight inside L_vq
    lambda_vq: float
    lambda_orth: float
    lambda_bal: float
    feature_source: str
    cf_epochs: int  # most epochs of the pretrained ID model
    cf_dim: int
    cf_patience: int  # early stopping of the ID model on held-out last training items (0 = run cf_epochs)
    cf_layers: int
    cf_learning_rate: float
    n_pseudo_cat: int
    category_field: object
    seed: int

    @classmethod
    def from_config(cls, config):
        def get(key, default):
            value = config[key]
            return default if value is None else value

        settings = cls(
            num_codebooks=int(get("mpq_num_codebooks", 4)),
            codebook_size=int(get("mpq_codebook_size", 256)),
            max_codebooks=int(get("mpq_max_codebooks", 8)),
            latent_dim=int(get("mpq_latent_dim", 32)),
            hidden_dim=int(get("mpq_hidden_dim", 128)),
            input_dim=int(get("mpq_input_dim", 64)),
            epochs=int(get("mpq_epochs", 100)),
            learning_rate=float(get("mpq_learning_rate", 1e-3)),
            batch_size=int(get("mpq_batch_size", 1024)),
            beta=float(get("mpq_beta", 0.25)),
            lambda_vq=float(get("mpq_lambda_vq", 1.0)),
            lambda_orth=float(get("mpq_lambda_orth", 0.1)),
            lambda_bal=float(get("mpq_lambda_bal", 0.01)),
            feature_source=str(get("item_feature_source", "cf")),
            cf_epochs=int(get("mpq_cf_epochs", 100)),
            cf_dim=int(get("mpq_cf_dim", 64)),
            cf_patience=int(get("mpq_cf_patience", 3)),
            cf_layers=int(get("mpq_cf_layers", 2)),
            cf_learning_rate=float(get("mpq_cf_learning_rate", 2e-3)),
            n_pseudo_cat=int(get("n_pseudo_cat", 100)),
            category_field=config["category_field"],
            seed=int(get("seed", 2020)),
        )
        settings.validate()
        return settings

    def validate(self):
        if self.codebook_size < 2:
            raise ValueError(
                f"mpq_codebook_size must be >= 2 (a codebook of one code carries no information), got {self.codebook_size}."
            )
        if self.max_codebooks < 1:
            raise ValueError(f"mpq_max_codebooks must be >= 1, got {self.max_codebooks}.")
        if not 2 <= self.num_codebooks <= self.max_codebooks:
            raise ValueError(
                f"mpq_num_codebooks must be between 2 and mpq_max_codebooks={self.max_codebooks}, got {self.num_codebooks}. "
                "Fix: lower mpq_num_codebooks, or raise mpq_max_codebooks (it bounds the decoder length and beam cost)."
            )
        if self.feature_source not in FEATURE_SOURCES:
            raise ValueError(f"item_feature_source must be one of {FEATURE_SOURCES}, got '{self.feature_source}'.")
        for key, value in (("mpq_latent_dim", self.latent_dim), ("mpq_hidden_dim", self.hidden_dim),
                           ("mpq_input_dim", self.input_dim), ("mpq_batch_size", self.batch_size),
                           ("mpq_cf_dim", self.cf_dim), ("n_pseudo_cat", self.n_pseudo_cat),
                           ("mpq_cf_layers", self.cf_layers)):
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}.")
        for key, value in (("mpq_epochs", self.epochs), ("mpq_cf_epochs", self.cf_epochs), ("mpq_cf_patience", self.cf_patience),
                           ("mpq_beta", self.beta), ("mpq_lambda_vq", self.lambda_vq),
                           ("mpq_lambda_orth", self.lambda_orth), ("mpq_lambda_bal", self.lambda_bal)):
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}.")
        for key, value in (("mpq_learning_rate", self.learning_rate), ("mpq_cf_learning_rate", self.cf_learning_rate)):
            if value <= 0:
                raise ValueError(f"{key} must be > 0, got {value}.")

    def key(self):
        return {k: v for k, v in self.__dict__.items() if k != "max_codebooks"}


@dataclass
class ItemTokens:
    """What the generator needs. Token ids are local per codebook (0..D-1); row 0 (PAD item) is all -1."""

    item2tokens: torch.LongTensor  # [n_items, M]
    item_cat: torch.LongTensor  # [n_items] category id, 0 = unknown
    token_cat: torch.LongTensor  # [M, D] majority category of the training items carrying the token, 0 = unknown
    stats: dict = field(default_factory=dict)
    from_cache: bool = False
    cache_file: str = ""

    def tuple_to_item(self):
        """{token tuple: item}: injective after `resolve_collisions`."""
        return {tuple(row): item for item, row in enumerate(self.item2tokens.tolist()) if item > 0}

    def posting_lists(self):
        """[M, D] -> list of item ids carrying that token (constrained decoding, CORP)."""
        M = self.item2tokens.size(1)
        lists = [[[] for _ in range(int(self.token_cat.size(1)))] for _ in range(M)]
        for item, row in enumerate(self.item2tokens.tolist()):
            if item > 0:
                for r, j in enumerate(row):
                    lists[r][j].append(item)
        return lists


# ---------------------------------------------------------------------------------------------------------------
# item input vectors v_i
# ---------------------------------------------------------------------------------------------------------------
def training_sequences(dataset):
    """Chronological training sequences [(user, [items])] of a REG4RecDataset (training split only)."""
    if not hasattr(dataset, "train_sequences"):
        raise ValueError(
            "The pretrained item embeddings (item_feature_source cf) need REG4RecDataset's training sequences; "
            "build the dataset through recbole_reason.create_dataset with model REG4Rec."
        )
    return dataset.train_sequences()


def feature_item_vectors(dataset, input_dim):
    """Multi-hot item attributes (all token / token_seq item fields in one id space) -> truncated SVD."""
    attributes = item_attributes(dataset)
    if attributes is None:
        return None
    n_items = dataset.item_num
    multi_hot = torch.zeros(n_items, attributes.vocab_size)
    multi_hot.scatter_(1, attributes.tokens, 1.0)
    multi_hot[:, 0] = 0.0
    multi_hot[0] = 0.0
    # idf weighting so that a genre shared by half the catalogue does not dominate rare title words
    df = multi_hot.sum(0).clamp(min=1.0)
    multi_hot = multi_hot * torch.log(n_items / df)
    if multi_hot.size(1) > input_dim:
        q = min(input_dim, min(multi_hot.shape) - 1)
        centered = multi_hot - multi_hot.mean(0, keepdim=True)
        u, s, _ = torch.svd_lowrank(centered, q=q, niter=4)
        vectors = u * s
    else:
        vectors = multi_hot
    vectors[0] = 0.0
    return vectors


class _CFSequenceModel(nn.Module):
    """A causal transformer over item ids (SASRec-style), only to learn item embeddings (tied output layer)."""

    def __init__(self, n_items, dim, max_len, layers=2, dropout=0.1):
        super().__init__()
        self.item_embedding = nn.Embedding(n_items, dim, padding_idx=0)
        self.position_embedding = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, dim * 2, dropout=dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.output_norm = nn.LayerNorm(dim)
        for module in self.modules():  # SASRec's init: N(0, 0.02) (PyTorch's N(0, 1) embeddings give CE ~ 20 at start)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def hidden(self, items):
        length = items.size(1)
        h = self.item_embedding(items) + self.position_embedding(torch.arange(length, device=items.device))
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=items.device), 1)
        return self.output_norm(self.encoder(h, mask=causal, src_key_padding_mask=items == 0))

    def forward(self, items):
        return self.hidden(items) @ self.item_embedding.weight.t()


def _padded(sequences, width):
    data = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, items in enumerate(sequences):
        data[row, : len(items)] = torch.tensor(items)
    return data


def _length_batches(lengths, batch_size, shuffle):
    """Row batches of similar length (sorted, ties broken at random) in random batch order: short sequences are
    then not padded to the longest one (Amazon's mean length is ~9 of 50)."""
    noise = torch.rand(len(lengths)) if shuffle else torch.zeros(len(lengths))
    order = torch.from_numpy(np.lexsort((noise.numpy(), lengths.numpy())))
    batches = list(order.split(batch_size))
    permutation = torch.randperm(len(batches)) if shuffle else range(len(batches))
    return [batches[i] for i in permutation]


@torch.no_grad()
def _held_out_cross_entropy(model, held_out, batch_size):
    """Mean next-item cross-entropy of each held-out last training item given the items before it."""
    model.eval()
    total, count = 0.0, 0
    lengths = (held_out > 0).sum(1)
    for rows in _length_batches(lengths, batch_size, shuffle=False):
        batch, last = held_out[rows], lengths[rows] - 1  # last: position of the held-out item
        h = model.hidden(batch[:, : int(last.max())])[torch.arange(len(rows)), last - 1]
        logits = h @ model.item_embedding.weight.t()
        total += float(F.cross_entropy(logits, batch[torch.arange(len(rows)), last], reduction="sum"))
        count += len(rows)
    model.train()
    return total / max(count, 1)


def pretrain_cf_item_embeddings(dataset, dim, epochs, max_len=50, batch_size=128, logger=None, progress=None,
                                monitor=None, patience=0, layers=1, dropout=0.1, learning_rate=1e-3):
    """Item embeddings of a next-item model (SASRec-style) fitted on the training split only (valid/test would leak).

    patience > 0: each user's last training item (users with >= 3) is held out; the model trains on the rest and
    stops when the held-out cross-entropy has not improved for `patience` epochs; the embeddings of its best epoch
    are returned (early stopping, as RecBole trains SASRec). patience 0: `epochs` epochs on everything.
    `progress` (a `TokenizerProgress`): resume from its saved epoch, and save after every epoch."""
    sequences = training_sequences(dataset)
    max_len = max(2, min(max_len, max(len(items) for _, items in sequences) - 1))  # no padding beyond the longest
    chunks, held_out = [], []
    for _, items in sequences:
        if patience > 0 and len(items) >= 3:
            held_out.append(items[-(max_len + 1):])
            items = items[:-1]
        for start in range(0, max(len(items) - 1, 1), max_len):
            chunk = items[start : start + max_len + 1]
            if len(chunk) >= 2:
                chunks.append(chunk)
    if not chunks:
        raise ValueError("No training sequence of length >= 2: cannot pretrain item embeddings for the tokenizer.")
    data = _padded(chunks, max_len + 1)
    lengths = (data > 0).sum(1)
    held_out = _padded(held_out, max_len + 1) if held_out else None
    model = _CFSequenceModel(dataset.item_num, dim, max_len, layers, dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    saved = progress.resume("cf", model, optimizer) if progress else None
    best = saved.get("best") if saved else None  # {"ce", "epoch", "embedding"} of the best epoch so far
    for epoch in _epochs(monitor, range(saved["epoch"] + 1 if saved else 0, epochs), "tokenizer: ID model"):
        if best is not None and held_out is not None and epoch - best["epoch"] > patience:
            break  # resumed after the stopping epoch
        total, batches = 0.0, _length_batches(lengths, batch_size, shuffle=True)
        for rows in batches:
            width = int(lengths[rows].max())
            batch = data[rows, :width]
            inputs, targets = batch[:, :-1], batch[:, 1:]
            logits = model(inputs)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        train_ce = total / max(1, len(batches))
        scalars = {"ce": train_ce}
        if held_out is not None:
            scalars["held_out_ce"] = _held_out_cross_entropy(model, held_out, 4 * batch_size)
            if best is None or scalars["held_out_ce"] < best["ce"]:
                best = {"ce": scalars["held_out_ce"], "epoch": epoch,
                        "embedding": model.item_embedding.weight.detach().clone()}
        if logger:
            logger.info(f"[MPQ tokenizer] pretrained ID model epoch {epoch}: "
                        + ", ".join(f"{name} {value:.4f}" for name, value in scalars.items()))
        if monitor:
            monitor.scalars("tokenizer/cf_pretrain", epoch, scalars)
        if progress:
            progress.save("cf", epoch, model, optimizer, best=best)
        if held_out is not None and epoch - best["epoch"] >= patience:
            if logger:
                logger.info(f"[MPQ tokenizer] ID model stopped early: best held-out CE {best['ce']:.4f} at epoch {best['epoch']}")
            break
    vectors = (best["embedding"] if best is not None else model.item_embedding.weight.detach()).clone()
    vectors[0] = 0.0
    return vectors


def check_tokenizer_inputs(settings, dataset, logger=None):
    """What the tokenizer needs, checked before anything is trained or written (REG4Rec.__init__ calls it): the
    item vectors `item_feature_source` asks for can be built, and D**M token tuples can identify every item.
    Without item features, `auto` logs that it falls back to the pretrained ID model and goes on."""
    source = settings.feature_source
    no_features = missing_item_features(dataset)  # None when the dataset has item features
    if source in ("features", "features+cf") and no_features:
        raise ValueError(
            f"item_feature_source '{source}' needs item features, but {no_features}. Fix: provide "
            f"{dataset.dataset_name}.item with token / token_seq columns listed in load_col.item, or set "
            "item_feature_source: cf (item embeddings of a pretrained ID model) or auto."
        )
    use_cf = source in ("cf", "features+cf") or (source == "auto" and no_features)
    if use_cf and settings.cf_epochs == 0:
        raise ValueError(
            f"No item input vectors for the MPQ tokenizer: dataset '{dataset.dataset_name}' has "
            f"{'no item features' if no_features else 'features'} and mpq_cf_epochs is 0 (no pretrained ID model)"
            f"{'; ' + no_features if no_features else ''}. Fix: set mpq_cf_epochs >= 1, or load item features "
            "(load_col.item) with item_feature_source: features."
        )
    n_items = dataset.item_num - 1
    if settings.codebook_size**settings.num_codebooks < n_items:
        raise ValueError(
            f"mpq_codebook_size ** mpq_num_codebooks = {settings.codebook_size}**{settings.num_codebooks} = "
            f"{settings.codebook_size ** settings.num_codebooks} token tuples cannot identify the {n_items} items of "
            f"dataset '{dataset.dataset_name}'. Fix: raise mpq_codebook_size or mpq_num_codebooks."
        )
    if source == "auto" and no_features and logger:
        logger.info(
            f"REG4Rec: no item features ({no_features}): the MPQ tokenizer reads the item embeddings of a pretrained "
            f"ID model instead (item_feature_source auto -> cf, mpq_cf_epochs={settings.cf_epochs})."
        )


def item_input_vectors(dataset, settings, logger=None, progress=None, monitor=None):
    """v_i [n_items, d]: standardised, row 0 (PAD) zero. Source chosen by `item_feature_source`."""
    check_tokenizer_inputs(settings, dataset)
    source = settings.feature_source
    features = feature_item_vectors(dataset, settings.input_dim) if source in ("auto", "features", "features+cf") else None
    use_cf = source in ("cf", "features+cf") or (source == "auto" and features is None)
    parts = [features] if features is not None else []
    if use_cf:
        parts.append(
            pretrain_cf_item_embeddings(dataset, settings.cf_dim, settings.cf_epochs, logger=logger, progress=progress,
                                        monitor=monitor, patience=settings.cf_patience, layers=settings.cf_layers,
                                        learning_rate=settings.cf_learning_rate)
        )
    vectors = []
    for part in parts:
        part = part - part[1:].mean(0, keepdim=True)
        part = part / part[1:].std().clamp(min=1e-8)
        vectors.append(part)
    vectors = torch.cat(vectors, dim=1)
    vectors[0] = 0.0
    return vectors


# ---------------------------------------------------------------------------------------------------------------
# MPQ: MoE-based Parallel Quantization
# ---------------------------------------------------------------------------------------------------------------
def kmeans(x, k, iterations=20):
    """Plain Lloyd's k-means (init: k distinct random points). Returns (centroids [k, d], assignment [n])."""
    k = min(k, x.size(0))
    centroids = x[torch.randperm(x.size(0))[:k]].clone()
    for _ in range(iterations):
        assign = torch.cdist(x, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)  # empty clusters stay put
    return centroids, torch.cdist(x, centroids).argmin(1)


class MPQ(nn.Module):
    """M parallel autoencoder experts E_r with codebooks C_r, router h_r(v), one shared decoder."""

    def __init__(self, input_dim, settings):
        super().__init__()
        M, D, d = settings.num_codebooks, settings.codebook_size, settings.latent_dim
        self.settings = settings
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(input_dim, settings.hidden_dim), nn.ReLU(), nn.Linear(settings.hidden_dim, d))
            for _ in range(M)
        )
        self.codebooks = nn.Parameter(torch.randn(M, D, d) * 0.1)  # C_r = {z_r1..z_rD}
        self.router = nn.Linear(input_dim, M)  # h_r(v)
        self.decoder = nn.Sequential(nn.Linear(d, settings.hidden_dim), nn.ReLU(), nn.Linear(settings.hidden_dim, input_dim))

    def encode(self, v):
        return torch.stack([expert(v) for expert in self.experts], dim=1)  # e_i^r [B, M, d]

    def distances(self, e):
        # ||e_i^r - z_rj||^2 for every codebook r: [B, M, D]
        # expanded form: the broadcast difference would be a [B, M, D, d] tensor (GBs on Amazon catalogues)
        cross = torch.einsum("bmd,mkd->bmk", e, self.codebooks)
        return ((e**2).sum(-1, keepdim=True) - 2 * cross + (self.codebooks**2).sum(-1).unsqueeze(0)).clamp(min=0)

    def quantize(self, v):
        """c_i^r = argmin_j ||e_i^r - z_rj||^2: the token of item i in codebook r."""
        return self.distances(self.encode(v)).argmin(-1)

    def losses(self, v):
        s = self.settings
        e = self.encode(v)
        codes = self.distances(e).argmin(-1)
        z = torch.stack([self.codebooks[r][codes[:, r]] for r in range(e.size(1))], dim=1)
        z_st = e + (z - e).detach()  # straight-through estimator per expert
        gate = torch.softmax(self.router(v), dim=-1)  # h_r(v_i)
        q = (gate.unsqueeze(-1) * z_st).sum(1)  # q_i = sum_r h_r(v_i) z_i^r
        v_hat = self.decoder(q)  # shared decoder
        reconstruction_loss = F.mse_loss(v_hat, v)
        vq_loss = F.mse_loss(z, e.detach()) + s.beta * F.mse_loss(e, z.detach())  # codebook + commitment
        orthogonality_loss = expert_orthogonality(e)
        balance_loss = (gate.mean(0) * torch.log(gate.mean(0) * gate.size(1) + 1e-9)).sum()  # KL(mean gate || U)
        total = reconstruction_loss + s.lambda_vq * vq_loss + s.lambda_orth * orthogonality_loss + s.lambda_bal * balance_loss
        return total, {"recon": reconstruction_loss, "vq": vq_loss, "orth": orthogonality_loss, "bal": balance_loss}

    @torch.no_grad()
    def kmeans_init(self, v):
        """TIGER / RQ-VAE practice: each codebook starts at k-means centroids of its expert's outputs."""
        e = self.encode(v)
        D = self.codebooks.size(1)
        for r in range(e.size(1)):
            centroids, _ = kmeans(e[:, r], D)
            if centroids.size(0) < D:  # fewer items than codes: the rest start at jittered copies
                extra = centroids[torch.randint(centroids.size(0), (D - centroids.size(0),))]
                centroids = torch.cat([centroids, extra + 0.01 * torch.randn_like(extra)])
            self.codebooks.data[r] = centroids

    @torch.no_grad()
    def reseed_dead_codes(self, v):
        """A code no item uses is moved onto a random expert output, so capacity is not wasted. Returns #reseeded."""
        e = self.encode(v)
        codes = self.distances(e).argmin(-1)
        reseeded = 0
        for r in range(e.size(1)):
            used = torch.bincount(codes[:, r], minlength=self.codebooks.size(1)) > 0
            dead = (~used).nonzero().flatten()
            if len(dead):
                self.codebooks.data[r, dead] = e[torch.randint(e.size(0), (len(dead),)), r]
                reseeded += len(dead)
        return reseeded


def expert_orthogonality(e):
    """Orthogonality regularisation: mean over items of sum_{r != s} (ê^r · ê^s)^2 on L2-normalised expert outputs."""
    normed = F.normalize(e, dim=-1)
    gram = normed @ normed.transpose(1, 2)
    off_diagonal = gram - torch.diag_embed(torch.diagonal(gram, dim1=1, dim2=2))
    return (off_diagonal**2).sum((1, 2)).mean()


def train_mpq(vectors, settings, logger=None, progress=None, monitor=None):
    """Fit MPQ on the item vectors (rows 1..n; row 0 is PAD). Returns (model, history of reconstruction losses).
    `progress` (a `TokenizerProgress`): resume from its saved epoch, and save after k-means init and every epoch."""
    v = vectors[1:]
    model = MPQ(v.size(1), settings)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    saved = progress.resume("mpq", model, optimizer) if progress else None
    if saved:
        history = list(saved["history"])
    else:
        model.kmeans_init(v)
        with torch.no_grad():
            history = [float(model.losses(v)[1]["recon"])]
        if progress:
            progress.save("mpq", -1, model, optimizer, vectors=vectors, history=history)
    for epoch in _epochs(monitor, range(saved["epoch"] + 1 if saved else 0, settings.epochs), "tokenizer: MPQ"):
        order = torch.randperm(v.size(0))
        for start in range(0, v.size(0), settings.batch_size):
            loss, _ = model.losses(v[order[start : start + settings.batch_size]])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch < settings.epochs - 1:
            model.reseed_dead_codes(v)
        with torch.no_grad():
            _, parts = model.losses(v)
        history.append(float(parts["recon"]))
        if monitor:
            monitor.scalars("tokenizer/mpq", epoch, parts)
        if logger and (epoch % 20 == 0 or epoch == settings.epochs - 1):
            logger.info(
                f"[MPQ tokenizer] epoch {epoch}: " + ", ".join(f"{name} {float(value):.4f}" for name, value in parts.items())
            )
        if progress:
            progress.save("mpq", epoch, model, optimizer, vectors=vectors, history=history)
    return model, history


# ---------------------------------------------------------------------------------------------------------------
# collisions
# ---------------------------------------------------------------------------------------------------------------
def collision_rate(item2tokens):
    """Share of items whose token tuple is also another item's: 1 - #distinct tuples / #items."""
    if len(item2tokens) == 0:
        return 0.0
    return 1.0 - len({tuple(row) for row in item2tokens.tolist()}) / len(item2tokens)


def resolve_collisions(distances):
    """Deterministic collision resolution. distances: [n, M, D] item-to-codeword distances (items 1..n).

    Every item starts at its nearest codeword per codebook. In a group of items sharing a tuple, the item closest to
    its codewords keeps it; each other item (in id order) moves to the unused tuple of least added distance, found by
    best-first search over per-codebook codeword ranks (the first candidates are the second-nearest codewords).
    Returns [n, M] local token ids, injective.
    """
    n, M, D = distances.shape
    if D**M < n:
        raise ValueError(
            f"mpq_codebook_size ** mpq_num_codebooks = {D}**{M} = {D ** M} token tuples cannot identify {n} items. "
            "Fix: raise mpq_codebook_size or mpq_num_codebooks."
        )
    order = distances.argsort(-1)  # [n, M, D]: codeword ranks per codebook
    sorted_dist = torch.gather(distances, 2, order)
    codes = order[:, :, 0].clone()
    own_distance = sorted_dist[:, :, 0].sum(1)
    groups = {}
    for item, row in enumerate(codes.tolist()):
        groups.setdefault(tuple(row), []).append(item)
    used = set(groups)
    for members in groups.values():
        if len(members) < 2:
            continue
        members = sorted(members, key=lambda i: (float(own_distance[i]), i))
        for item in members[1:]:
            costs = (sorted_dist[item] - sorted_dist[item, :, :1]).tolist()  # added distance per rank
            ranks = order[item].tolist()
            start = (0,) * M
            heap, seen = [(0.0, start)], {start}
            while heap:
                cost, state = heapq.heappop(heap)
                candidate = tuple(ranks[r][state[r]] for r in range(M))
                if candidate not in used:
                    used.add(candidate)
                    codes[item] = torch.tensor(candidate)
                    break
                for r in range(M):
                    if state[r] + 1 < D:
                        nxt = state[:r] + (state[r] + 1,) + state[r + 1 :]
                        if nxt not in seen:
                            seen.add(nxt)
                            heapq.heappush(heap, (sum(costs[q][nxt[q]] for q in range(M)), nxt))
    return codes


# ---------------------------------------------------------------------------------------------------------------
# categories
# ---------------------------------------------------------------------------------------------------------------
def item_category_ids(dataset, vectors, settings):
    """[n_items] category per item (0 = unknown): real categories when the dataset has them, else k-means on v_i."""
    categories, source = item_categories(dataset, settings.category_field)
    if categories is not None:
        return categories.long().clone(), f"field:{source}"
    _, assign = kmeans(vectors[1:], settings.n_pseudo_cat)
    cats = torch.zeros(vectors.size(0), dtype=torch.long)
    cats[1:] = assign + 1
    return cats, f"kmeans:{settings.n_pseudo_cat}"


def token_categories(item2tokens, item_cat, train_items, codebook_size):
    """[M, D] majority category of the *training* items carrying each token (0 when none carries it)."""
    M = item2tokens.size(1)
    n_cat = int(item_cat.max()) + 1
    table = torch.zeros(M, codebook_size, dtype=torch.long)
    items = train_items[(train_items > 0) & (item_cat[train_items] > 0)]
    for r in range(M):
        counts = torch.zeros(codebook_size, n_cat)
        counts.index_put_((item2tokens[items, r], item_cat[items]), torch.ones(len(items)), accumulate=True)
        table[r] = torch.where(counts.sum(1) > 0, counts.argmax(1), torch.zeros_like(table[r]))
    return table


# ---------------------------------------------------------------------------------------------------------------
# cache + entry point
# ---------------------------------------------------------------------------------------------------------------
def dataset_fingerprint(dataset):
    """Hash of what the tokens depend on: the item id vocabulary, the item features and the training sequences."""
    digest = hashlib.sha1()
    digest.update("\x1f".join(map(str, dataset.field2id_token[dataset.iid_field])).encode())
    attributes = item_attributes(dataset)
    if attributes is not None:
        digest.update(attributes.tokens.numpy().tobytes())
    for user, items in training_sequences(dataset):
        digest.update(np.asarray([user] + list(items), dtype=np.int64).tobytes())
    return digest.hexdigest()


def cache_path(config, dataset, settings):
    folder = config["tokenizer_cache_dir"] or os.path.join(config["checkpoint_dir"], "reg4rec_tokens")
    key = hashlib.sha1(json.dumps({"version": CACHE_VERSION, **settings.key()}, sort_keys=True, default=str).encode())
    return os.path.join(folder, f"{dataset.dataset_name}-{key.hexdigest()[:16]}.pt")


def code_usage(item2tokens, codebook_size):
    """Per codebook: share of codes used by >= 1 item, and the perplexity of the code distribution."""
    usage, perplexity = [], []
    for r in range(item2tokens.size(1)):
        counts = torch.bincount(item2tokens[1:, r], minlength=codebook_size).float()
        p = counts / counts.sum()
        usage.append(float((counts > 0).float().mean()))
        perplexity.append(float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())))
    return usage, perplexity


@torch.no_grad()
def code_coherence(item2tokens, vectors, k=10, chunk=2048):
    """Share of an item's k nearest neighbours (cosine of `vectors`, items 1..n) that share >= 1 token with it
    (the same code in the same codebook), averaged over items. Semantic codes score high; arbitrary ones score
    about M / D (the chance that one of M codes matches)."""
    items = F.normalize(vectors[1:].float(), dim=1)
    codes = item2tokens[1:]
    k = min(k, items.size(0) - 1)
    if k < 1:
        return 0.0
    shared = 0.0
    for start in range(0, items.size(0), chunk):
        similarity = items[start : start + chunk] @ items.t()
        rows = torch.arange(similarity.size(0))
        similarity[rows, rows + start] = float("-inf")  # not its own neighbour
        neighbours = similarity.topk(k, dim=1).indices  # [c, k]
        same = (codes[neighbours] == codes[start : start + chunk].unsqueeze(1)).any(-1)  # [c, k]
        shared += float(same.float().sum())
    return shared / (items.size(0) * k)


def atomic_save(obj, path):
    """torch.save through a temporary file and a rename: an interrupted write never leaves a truncated `path`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(obj, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def stale_reason(stored, fingerprint, settings, n_items):
    """Why a stored cache / partial state does not belong to this dataset and these settings (None: it does)."""
    if not isinstance(stored, dict) or stored.get("version") != CACHE_VERSION:
        return f"it was written by another tokenizer version ({stored.get('version') if isinstance(stored, dict) else '?'})"
    if stored.get("fingerprint") != fingerprint:
        return "it was built for another dataset (item ids, item features or training sequences differ)"
    if stored.get("settings") != settings.key():
        other = stored.get("settings") or {}
        changed = sorted(key for key in settings.key() if other.get(key) != settings.key()[key])
        return f"it was built with other tokenizer settings ({', '.join(changed)})"
    table = stored.get("item2tokens")
    if table is not None and tuple(table.shape) != (n_items, settings.num_codebooks):
        return f"its item table has shape {tuple(table.shape)}, this dataset needs ({n_items}, {settings.num_codebooks})"
    return None


def load_cache(path, fingerprint, settings, n_items, logger):
    """The cached ItemTokens at `path` when they belong to this dataset and these settings, else None (logged)."""
    if not os.path.isfile(path):
        return None
    try:
        cached = load_checkpoint(path)
    except Exception as error:  # truncated or foreign file: any unpickling error means "not ours"
        logger.warning(f"[MPQ tokenizer] cache {path} is unreadable ({type(error).__name__}: {error}): rebuilding it")
        return None
    problem = stale_reason(cached, fingerprint, settings, n_items)
    if problem:
        logger.warning(f"[MPQ tokenizer] cache {path} is stale: {problem}. Rebuilding it.")
        return None
    logger.info(f"[MPQ tokenizer] reusing cached item tokens {path}")
    return ItemTokens(cached["item2tokens"], cached["item_cat"], cached["token_cat"], cached["stats"], True, path)


class TokenizerMonitor:
    """What the tokenizer's epoch loops report: a tqdm bar per loop when `show_progress` is on, and every epoch's
    losses as TensorBoard scalars (`tokenizer/mpq/<loss>`, `tokenizer/cf_pretrain/ce`). Draws no random numbers."""

    def __init__(self, tensorboard=None, show_progress=False):
        self.tensorboard, self.show_progress = tensorboard, bool(show_progress)

    def epochs(self, epochs, desc):
        from tqdm import tqdm

        return tqdm(epochs, desc=desc, unit="epoch", disable=not self.show_progress)

    def scalars(self, prefix, epoch, values):
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(f"{prefix}/{name}", float(value), epoch)


def _epochs(monitor, epochs, desc):
    return monitor.epochs(epochs, desc) if monitor else epochs


class TokenizerProgress:
    """The partial state of one tokenizer build, in `<cache file>.partial`: after every epoch of a stage ('cf': the
    pretrained ID model, 'mpq': MPQ), that stage's weights, optimizer state, epoch and the CPU RNG state (plus, for
    'mpq', the item vectors and loss history). A later build with the same dataset and settings resumes from it; a
    partial file of other data or settings is ignored (and overwritten)."""

    STAGES = ("cf", "mpq")

    def __init__(self, cache_file, fingerprint, settings, n_items, logger):
        self.path = cache_file + ".partial"
        self.header = {"version": CACHE_VERSION, "fingerprint": fingerprint, "settings": settings.key()}
        self.logger = logger
        self.state = self._load(fingerprint, settings, n_items)

    def _load(self, fingerprint, settings, n_items):
        if not os.path.isfile(self.path):
            return None
        try:
            state = load_checkpoint(self.path)
        except Exception as error:
            self.logger.warning(f"[MPQ tokenizer] partial state {self.path} is unreadable ({type(error).__name__}): starting over")
            return None
        problem = stale_reason(state, fingerprint, settings, n_items) or (
            None if state.get("stage") in self.STAGES else f"unknown stage {state.get('stage')!r}"
        )
        if problem:
            self.logger.warning(f"[MPQ tokenizer] partial state {self.path} is not this build's: {problem}. Starting over.")
            return None
        self.logger.info(
            f"[MPQ tokenizer] resuming the interrupted build from {self.path}: stage {state['stage']}, "
            f"{state['epoch'] + 1} epoch(s) done"
        )
        return state

    @property
    def vectors(self):
        """The item vectors of an interrupted MPQ stage (the ID model stage before it is then complete)."""
        return self.state["vectors"] if self.state and self.state["stage"] == "mpq" else None

    def resume(self, stage, model, optimizer):
        """Load the saved state of `stage` into model and optimizer and restore the RNG; returns the state or None."""
        if not self.state or self.state["stage"] != stage:
            return None
        model.load_state_dict(self.state["model"])
        optimizer.load_state_dict(self.state["optimizer"])
        torch.set_rng_state(self.state["rng"])
        return self.state

    def save(self, stage, epoch, model, optimizer, **extra):
        state = {**self.header, "stage": stage, "epoch": epoch, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), **extra}
        atomic_save(state, self.path)

    def finish(self):
        if os.path.exists(self.path):
            os.remove(self.path)


def build_item_tokens(config, dataset, logger=None, settings=None, monitor=None):
    """Load the item -> tokens table from the cache, or build it (resuming an interrupted build) and cache it.
    `dataset`: the training split. Nothing is written before the inputs are checked."""
    logger = logger or getLogger()
    settings = settings or TokenizerSettings.from_config(config)
    check_tokenizer_inputs(settings, dataset)
    path = cache_path(config, dataset, settings)
    fingerprint = dataset_fingerprint(dataset)
    cached = load_cache(path, fingerprint, settings, dataset.item_num, logger)
    if cached is not None:
        return cached

    progress = TokenizerProgress(path, fingerprint, settings, dataset.item_num, logger)
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        vectors = progress.vectors
        if vectors is None:
            vectors = item_input_vectors(dataset, settings, logger, progress, monitor)
        mpq, history = train_mpq(vectors, settings, logger, progress, monitor)
        with torch.no_grad():
            distances = mpq.distances(mpq.encode(vectors[1:]))
        nearest = distances.argmin(-1)
        resolved = resolve_collisions(distances)
        item2tokens = torch.full((vectors.size(0), settings.num_codebooks), -1, dtype=torch.long)
        item2tokens[1:] = resolved
        item_cat, category_source = item_category_ids(dataset, vectors, settings)

    train_items = torch.tensor(sorted({i for _, items in training_sequences(dataset) for i in items}), dtype=torch.long)
    token_cat = token_categories(item2tokens.clamp(min=0), item_cat, train_items, settings.codebook_size)
    usage, perplexity = code_usage(item2tokens.clamp(min=0), settings.codebook_size)
    stats = {
        "collision_rate_before": collision_rate(nearest),
        "collision_rate_after": collision_rate(resolved),
        "code_usage": usage,
        "code_perplexity": perplexity,
        "reconstruction_loss_start": history[0],
        "reconstruction_loss_end": history[-1],
        "category_source": category_source,
        "input_dim": int(vectors.size(1)),
        "feature_source": settings.feature_source,
        "code_coherence": code_coherence(item2tokens, vectors),  # neighbours by the tokenizer's own input vectors
    }
    atomic_save(
        {
            "version": CACHE_VERSION,
            "fingerprint": fingerprint,
            "settings": settings.key(),
            "item2tokens": item2tokens,
            "item_cat": item_cat,
            "token_cat": token_cat,
            "stats": stats,
            "mpq_state_dict": mpq.state_dict(),  # frozen MPQ checkpoint
            "item_vectors": vectors,  # the tokenizer's input (tokenizer report: collaborative neighbours)
        },
        path,
    )
    progress.finish()
    logger.info(f"[MPQ tokenizer] built and cached {path}: {json.dumps(stats)}")
    return ItemTokens(item2tokens, item_cat, token_cat, stats, False, path)
