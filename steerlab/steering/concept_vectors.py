"""Parametric concept vectors (METHODS 8, ConceptVectors): down-projection columns whose vocabulary
projection names a concept.

Every column ``v`` of every MLP down projection (dense, each routed expert, shared experts; see
:mod:`steerlab.interventions.columns`) is read through the unembedding, ``logits = W_U norm(v)``
(``final_norm=True`` passes ``v`` through the model's own final norm module first, so its gain — e.g.
Gemma's ``1 + w`` — applies; ``False`` uses ``W_U v``). A concept is a set of token ids
(:func:`concept_token_ids`: a word list expanded to the single-token variants with and without a
leading space and in lower / Title / UPPER case, or explicit ids).

Ranking (our choice, documented): a token's **z-score** in a column is its logit minus the mean logit
over the vocabulary, divided by their standard deviation. A column's **score** is the summed z-score of
the concept tokens that are among its ``top_k`` tokens (columns with none are dropped), so it grows
with both how many concept variants the column promotes and how far they stand out;
``rank_by="fraction"`` ranks by the number of concept tokens in the top-k instead (ties by the summed
z-score). Two stages keep this cheap on a real model: the concept tokens' z-scores of *every* column come
exactly from the vocabulary's mean and covariance (no full projection); the ``shortlist`` columns with the
highest concept z-score (as (column, sign) pairs) are then projected onto the whole vocabulary for their exact top-k
(``shortlist=None`` projects every column). ``both_signs=True`` (default) also searches ``-v``: in gated
MLPs (SwiGLU: ``act(gate) * up``) a neuron's activation takes either sign, so a neuron writes ``+v`` or
``-v`` alike; the paper read ``+v`` only (``both_signs=False``).

The vocabulary reading cannot tell which of ``±v`` a neuron actually writes: :meth:`ConceptSearch.in_context`
keeps the hits whose mean write coefficient on given prompts has the hit's sign (measured on the Qwen
default: the best "Python" column, layer 23 neuron 157, reads "``-v`` promotes Python" but fires positively
on Python questions, so it suppresses the answer there and ablating it raises p(Python)).

Example:
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> search = find_concept_vectors(model, ["poem"], top_k=20)
    >>> print(search.table(5).splitlines()[0])
    concept 'poem': tokens ['poem', ' poem']; 288 columns searched, top_k=20, ranked by zscore
    >>> with model.apply(search.edit(10, scale=0.0)):
    ...     _ = model.generate(["Write a short poem."], max_new_tokens=4)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch
from tqdm.auto import tqdm

from steerlab.arch import resolve_path
from steerlab.errors import EmptyInputError, ShapeError, SteerlabError
from steerlab.eval.answers import word_variants
from steerlab.interventions.columns import Column, ColumnEdit, ColumnGroup, column_groups

if TYPE_CHECKING:
    from steerlab.model import Model

RankBy = Literal["zscore", "fraction"]


class ConceptTokenError(SteerlabError, ValueError):
    """A concept's words have no single-token form in the vocabulary, or a token id is out of range."""


def concept_token_ids(
    tokenizer, concept: str | Sequence[str] | Sequence[int], *, variants: bool = True
) -> tuple[int, ...]:
    """Token ids of a concept: each word's single-token variants (with/without a leading space; lower, Title,
    UPPER case) or explicit ids. Words with no single-token variant are skipped; none at all is an error.

    Example:
        >>> from steerlab.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> [tok.decode(i) for i in concept_token_ids(tok, ["poem"])]
        ['poem', ' poem']
    """
    items = [concept] if isinstance(concept, (str, int)) else list(concept)
    if not items:
        raise EmptyInputError("the concept is empty; pass words (e.g. ['Python']) or token ids")
    vocab = len(tokenizer)
    ids: set[int] = set()
    missing: dict[str, list[list[str]]] = {}
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            if not 0 <= item < vocab:
                raise ConceptTokenError(
                    f"token id {item} is out of range: the vocabulary has {vocab} tokens (0..{vocab - 1})"
                )
            ids.add(item)
            continue
        if not isinstance(item, str) or not item.strip():
            raise ConceptTokenError(f"a concept item must be a non-empty word or a token id; got {item!r}")
        found = False
        for form in word_variants(item) if variants else [item]:
            enc = tokenizer.encode(form, add_special_tokens=False)
            if len(enc) == 1:
                ids.add(int(enc[0]))
                found = True
        if not found:
            missing[item] = [
                tokenizer.convert_ids_to_tokens(tokenizer.encode(f, add_special_tokens=False))
                for f in word_variants(item)[:2]
            ]
    if not ids:
        shown = "; ".join(f"{w!r} -> {t}" for w, t in missing.items())
        raise ConceptTokenError(
            f"no word of the concept is a single token in this vocabulary ({shown}); pick shorter or more common "
            "words, or pass token ids directly (tokenizer.encode(' word')[0])"
        )
    return tuple(sorted(ids))


class VocabProjection:
    """The unembedding as used for column reading: logits, and exact z-scores from the vocabulary's moments.

    Rows beyond ``len(tokenizer)`` (padding of the embedding matrix) are left out; a bias becomes an extra
    input column. Logit soft-capping (Gemma 2) is monotone and is not applied.

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> vp, v = VocabProjection(model), torch.randn(model.d_model)
        >>> vp.zscores(vp.inputs(v[None]), [42]).shape
        torch.Size([1, 1])
    """

    def __init__(self, model: Model, *, final_norm: bool = True) -> None:
        unembed = resolve_path(model.hf, model.spec.unembed)
        n_vocab = min(int(unembed.weight.shape[0]), len(model.tokenizer))
        w = unembed.weight.detach()[:n_vocab].float().cpu()
        bias = getattr(unembed, "bias", None)
        self.has_bias = bias is not None
        if self.has_bias:
            w = torch.cat([w, bias.detach()[:n_vocab, None].float().cpu()], dim=1)
        self.weight = w  # [V, d (+1)]
        mean = w.double().mean(0)
        centred = w - mean.float()
        self.mean = mean
        self.cov = (centred.T @ centred).double() / n_vocab  # [d, d] (float32 sums of centred rows)
        self.norm = resolve_path(model.hf, model.spec.final_norm) if final_norm else None
        self.n_vocab = n_vocab

    @torch.inference_mode()
    def inputs(self, vectors: torch.Tensor) -> torch.Tensor:
        """What the unembedding reads for residual vectors ``[n, d]``: ``norm(v)`` (or ``v``), plus a 1 for a bias."""
        x = vectors.float()
        if self.norm is not None:
            p = next(self.norm.parameters(), None)
            dtype, device = (p.dtype, p.device) if p is not None else (x.dtype, x.device)
            x = self.norm(x.to(device=device, dtype=dtype)).float().cpu()
        if self.has_bias:
            x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
        return x

    def zscores(self, x: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
        """z-scores ``[n, len(token_ids)]`` of the tokens' logits within each row's logit distribution (exact)."""
        x64 = x.double()
        mean = x64 @ self.mean
        std = ((x64 @ self.cov) * x64).sum(-1).clamp_min(1e-30).sqrt()
        logits = x @ self.weight[list(token_ids)].T
        return (logits.double() - mean[:, None]) / std[:, None]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Full logits ``[n, V]``."""
        return x @ self.weight.T


@dataclass(frozen=True)
class ConceptHit:
    """One column whose top tokens include the concept: where it is, its score, and its top tokens."""

    column: Column
    sign: int  # +1: the column promotes the concept; -1: its negation does
    score: float
    concept_z: float  # the best concept token's z-score
    n_in_top: int
    top_k: int
    top_tokens: tuple[str, ...]
    activation: float | None = None  # mean write coefficient in context (ConceptSearch.in_context), if read

    @property
    def fraction(self) -> float:
        """Share of the top-k tokens that are concept tokens."""
        return self.n_in_top / self.top_k


@dataclass(frozen=True)
class ConceptSearch:
    """Ranked concept columns (best first), with what was searched and how."""

    concept: str
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    hits: tuple[ConceptHit, ...]
    rank_by: str
    top_k: int
    n_searched: int
    final_norm: bool

    def __len__(self) -> int:
        return len(self.hits)

    def columns(self, n: int | None = None) -> list[Column]:
        """The addresses of the best ``n`` distinct columns (all if ``None``; a column that matched with both signs
        counts once, at its better rank)."""
        unique = list(dict.fromkeys(h.column for h in self.hits))
        return unique[:n]

    def edit(self, n: int | None = None, *, scale: float = 0.0) -> ColumnEdit:
        """A :class:`ColumnEdit` that scales the best ``n`` columns (``scale=0``: ablate them)."""
        if not self.hits:
            raise EmptyInputError(f"no column matched the concept {self.concept!r}; raise top_k or shortlist")
        return ColumnEdit(self.columns(n), scale=scale)

    def in_context(
        self, model: Model, prompts: Sequence[str], *, n: int | None = None, chat: bool = True
    ) -> ConceptSearch:
        """The hits whose column writes *toward* the concept in these prompts' context, ranking unchanged.

        A column's vocabulary reading says what ``+v`` (``sign=+1``) or ``-v`` (``sign=-1``) promotes, but the
        neuron's activation decides which one is written: at the prompts' last token, the mean write coefficient
        (:func:`~steerlab.measure.column_activations`) must have the hit's sign, otherwise the column
        suppresses the concept there and ablating it raises the concept's probability. Use prompts that are not
        your evaluation set. Each kept hit records its mean coefficient in ``activation``.

        Example:
            >>> from steerlab.testing import tiny_model
            >>> model = tiny_model("llama")
            >>> search = find_concept_vectors(model, ["poem"])
            >>> promoting = search.in_context(model, ["Write a short poem."], n=100)
            >>> len(promoting) <= len(search), all(h.activation is not None for h in promoting.hits)
            (True, True)
            >>> edit = promoting.edit(20, scale=0.0)
        """
        from steerlab.measure.columns import column_activations

        hits = self.hits[:n]
        if not hits:
            return self
        mean = column_activations(model, prompts, [h.column for h in hits], chat=chat).mean(0)
        kept = tuple(replace(h, activation=float(a)) for h, a in zip(hits, mean.tolist()) if h.sign * a > 0)
        return replace(self, hits=kept)

    def table(self, n: int = 10, *, show: int = 8) -> str:
        """A text table of the best ``n`` columns and their first ``show`` top tokens."""
        acts = any(h.activation is not None for h in self.hits[:n])
        head = f"{'rank':>4}  {'column':<18} {'sign':>4} {'score':>7} {'z_max':>6} {'in_top':>7}" + (
            f" {'act':>7}" if acts else ""
        )
        head += "  top tokens"
        title = (
            f"concept {self.concept!r}: tokens {list(self.tokens)}; {self.n_searched} columns searched, "
            f"top_k={self.top_k}, ranked by {self.rank_by}"
        )
        rows = [title, head]
        for i, h in enumerate(self.hits[:n], 1):
            where = "L{} N{}".format(*h.column) if len(h.column) == 2 else "L{} E{} N{}".format(*h.column)
            toks = ", ".join(repr(t) for t in h.top_tokens[:show])
            act = f" {h.activation:>+7.2f}" if acts and h.activation is not None else (" " * 8 if acts else "")
            rows.append(
                f"{i:>4}  {where:<18} {'+' if h.sign > 0 else '-':>4} {h.score:>7.1f} {h.concept_z:>6.1f} "
                f"{f'{h.n_in_top}/{h.top_k}':>7}{act}  {toks}"
            )
        if not self.hits:
            rows.append("  (no column has a concept token among its top tokens)")
        return "\n".join(rows)


def _label(concept) -> str:
    items = [concept] if isinstance(concept, (str, int)) else list(concept)
    return "/".join(str(i) for i in items)


@torch.inference_mode()
def find_concept_vectors(
    model: Model,
    concept: str | Sequence[str] | Sequence[int],
    *,
    layers: Sequence[int] | int | None = None,
    top_k: int = 20,
    rank_by: RankBy = "zscore",
    final_norm: bool = True,
    both_signs: bool = True,
    shortlist: int | None = 2000,
    chunk: int = 256,
    projection: VocabProjection | None = None,
    progress: bool = False,
) -> ConceptSearch:
    """Search every down-projection column of ``layers`` (default all) for the concept; see the module docs.

    ``projection`` reuses a :class:`VocabProjection` across searches (it must match ``final_norm``).

    Example:
        >>> from steerlab.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> search = find_concept_vectors(model, ["poem"], layers=range(1, 3))
        >>> [layer in (1, 2) for layer, neuron in search.columns(3)]
        [True, True, True]
    """
    if top_k < 1:
        raise ShapeError(f"top_k must be >= 1; got {top_k}")
    if rank_by not in ("zscore", "fraction"):
        raise ShapeError(f"rank_by must be 'zscore' or 'fraction'; got {rank_by!r}")
    ids = concept_token_ids(model.tokenizer, concept)
    vocab = projection if projection is not None else VocabProjection(model, final_norm=final_norm)
    if (vocab.norm is not None) != final_norm:
        raise ShapeError(
            f"the projection was built with final_norm={vocab.norm is not None}, but final_norm={final_norm}"
        )
    groups = column_groups(model, layers=layers if layers is None or isinstance(layers, int) else list(layers))
    signs = (1, -1) if both_signs else (1,)

    # stage 1: every column's best concept z-score (exact, from the vocabulary moments)
    best: list[torch.Tensor] = []
    for g in tqdm(groups, desc="concept z-scores", unit="group", disable=not progress):
        z = vocab.zscores(vocab.inputs(g.vectors(model)), ids)
        best.append(torch.stack([(s * z).max(-1).values for s in signs], dim=-1))  # [n, n_signs]
    flat = torch.cat([b.reshape(-1) for b in best])
    n_total = int(flat.numel())
    keep = n_total if shortlist is None else min(int(shortlist), n_total)
    chosen = torch.topk(flat, keep).indices.sort().values

    # stage 2: exact top-k over the whole vocabulary for the shortlisted (column, sign) pairs
    offsets = torch.tensor([0] + [b.numel() for b in best]).cumsum(0)
    per_group: dict[int, list[tuple[int, int]]] = {}
    for f in chosen.tolist():
        gi = int(torch.searchsorted(offsets, f, right=True)) - 1
        local = f - int(offsets[gi])
        per_group.setdefault(gi, []).append((local // len(signs), signs[local % len(signs)]))
    hits: list[ConceptHit] = []
    for gi, items in per_group.items():
        hits += _exact_hits(model, vocab, groups[gi], items, torch.tensor(ids), top_k=top_k, chunk=chunk)
    if rank_by == "zscore":
        hits.sort(key=lambda h: (-h.score, -h.concept_z))
    else:
        hits.sort(key=lambda h: (-h.n_in_top, -h.score))
    return ConceptSearch(
        concept=_label(concept),
        token_ids=ids,
        tokens=tuple(model.tokenizer.decode([i]) for i in ids),
        hits=tuple(hits),
        rank_by=rank_by,
        top_k=top_k,
        n_searched=n_total // len(signs),
        final_norm=final_norm,
    )


def _exact_hits(model: Model, vocab: VocabProjection, group: ColumnGroup, items: list[tuple[int, int]],
                concept: torch.Tensor, *, top_k: int, chunk: int) -> list[ConceptHit]:  # fmt: skip
    out = []
    cols = torch.tensor([c for c, _ in items])
    sgn = torch.tensor([s for _, s in items], dtype=torch.float32)
    x_all = vocab.inputs(group.vectors(model, cols.tolist()))
    for start in range(0, len(items), chunk):
        x = x_all[start : start + chunk]
        s = sgn[start : start + chunk]
        logits = vocab.logits(x) * s[:, None]
        top = torch.topk(logits, min(top_k, vocab.n_vocab), dim=-1).indices  # [n, k]
        z = vocab.zscores(x, concept.tolist()) * s[:, None].double()  # [n, |C|]
        member = top[:, :, None] == concept[None, None, :]  # [n, k, |C|]
        in_top = member.any(1)  # [n, |C|]
        for row in range(x.shape[0]):
            n_in = int(in_top[row].sum())
            if n_in == 0:
                continue
            out.append(
                ConceptHit(
                    column=group.address(int(cols[start + row])),
                    sign=int(s[row]),
                    score=float((z[row] * in_top[row]).sum()),
                    concept_z=float(z[row].max()),
                    n_in_top=n_in,
                    top_k=int(top.shape[1]),
                    top_tokens=tuple(model.tokenizer.decode([int(t)]) for t in top[row]),
                )
            )
    return out
