"""Estimators of the spurious direction from paired activations (pure tensor functions).

Input: activations ``hi`` [n, d] and ``lo`` [n, d] of ``n`` pairs (a prompt and its
spurious counterfactual), oriented so that ``hi`` is the side on which the model's output
property ``P`` is larger (no group labels are needed). Each estimator returns write
vectors ``A`` [k, d] (unit rows) and read vectors ``B`` [k, d] with ``B A^T = I``.

- :func:`diff_means`: ``a`` = the mean difference ``E[hi - lo]`` (rank 1), or the ``k``
  leading right-singular vectors of the differences; ``b = a`` (orthogonal projection).
- :func:`leace`: the LEACE eraser (Belrose et al. 2023) of the binary attribute ``z``
  (``z = 1`` on ``hi``) from the pooled activations: with ``S`` the (shrunk) covariance and
  ``s = Cov(x, z)``, the least-squares eraser is ``r(x) = x - S^{-1/2} P S^{-1/2} (x - mu)``
  with ``P`` the projector on ``S^{-1/2} s``, i.e. ``x - a b . (x - mu)`` with
  ``a = s/|s|`` and ``b = |s| S^{-1} s / (s^T S^{-1} s)``. After it no linear classifier
  of the pooled activations beats chance at telling ``z``. A binary attribute has rank 1.
- :func:`probe_directions`: iterated nullspace projection (INLP, Ravfogel et al. 2020):
  a logistic probe of ``z``, its weight as ``a = b``, projected out, ``k`` times.

:func:`orthogonal_to` makes write vectors orthogonal to a causal direction (keeping the
explicit cue) and rescales reads so ``B A^T = I`` still holds.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["diff_means", "leace", "probe_directions", "orthogonal_to", "biorthogonal", "shrunk_covariance"]


def _unit(v: Tensor) -> Tensor:
    n = v.norm()
    if not torch.isfinite(n) or n == 0:
        raise ValueError("The paired activations do not differ: no direction can be fitted at this site")
    return v / n


def diff_means(
    hi: Float[Tensor, "n d"], lo: Float[Tensor, "n d"], rank: int = 1
) -> tuple[Float[Tensor, "k d"], Float[Tensor, "k d"]]:
    """Mean paired difference (rank 1) or the ``rank`` leading singular directions of the differences."""
    delta = (hi - lo).double()
    if rank == 1:
        a = _unit(delta.mean(0))[None]
        return a, a.clone()
    a = paired_svd(delta, rank)
    return a, a.clone()


def paired_svd(delta: Float[Tensor, "n d"], rank: int) -> Float[Tensor, "k d"]:
    """The ``rank`` leading right-singular vectors of paired differences (uncentred, float64), orthonormal rows,
    each sign-aligned with the mean difference."""
    delta = delta.double()
    if rank > min(delta.shape):
        raise ValueError(f"rank {rank} exceeds what {delta.shape[0]} pairs in {delta.shape[1]} dimensions support")
    _, _, vh = torch.linalg.svd(delta, full_matrices=False)
    a = vh[:rank]
    signs = torch.sign(a @ delta.mean(0))
    return a * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]


def shrunk_covariance(x: Float[Tensor, "n d"], shrinkage: float = 0.1) -> Float[Tensor, "d d"]:
    """``(1 - lam) Cov(x) + lam * tr(Cov)/d * I`` (Ledoit-Wolf-style shrinkage keeps it invertible)."""
    if not 0 <= shrinkage <= 1:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    x = x.double()
    xc = x - x.mean(0)
    cov = xc.T @ xc / max(1, x.shape[0] - 1)
    d = cov.shape[0]
    scale = torch.trace(cov) / d
    if scale <= 0:
        scale = torch.tensor(1.0, dtype=torch.float64, device=x.device)
    return (1 - shrinkage) * cov + shrinkage * scale * torch.eye(d, dtype=torch.float64, device=x.device)


def leace(
    hi: Float[Tensor, "n d"],
    lo: Float[Tensor, "n d"],
    rank: int = 1,
    *,
    shrinkage: float = 0.1,
    sigma: Float[Tensor, "d d"] | None = None,
) -> tuple[Float[Tensor, "1 d"], Float[Tensor, "1 d"]]:
    """The LEACE eraser of ``z`` (1 on ``hi``, 0 on ``lo``); ``sigma`` overrides the covariance."""
    if rank != 1:
        raise ValueError(
            "LEACE erases a binary attribute with a rank-1 edit; for rank > 1 use diff-means (singular "
            "directions of the paired differences) or probe (iterated nullspace projection)"
        )
    x = torch.cat([hi, lo]).double()
    z = torch.cat([torch.ones(len(hi), device=x.device), torch.zeros(len(lo), device=x.device)]).double()
    s = (x - x.mean(0)).T @ (z - z.mean()) / max(1, len(z) - 1)
    cov = shrunk_covariance(x, shrinkage) if sigma is None else sigma.double()
    s_norm = s.norm()
    if s_norm == 0:
        raise ValueError("The paired activations do not differ: no direction can be fitted at this site")
    solved = torch.linalg.solve(cov, s)
    a = s / s_norm
    b = solved * s_norm / (s @ solved)
    return a[None], b[None]


def probe_directions(
    hi: Float[Tensor, "n d"], lo: Float[Tensor, "n d"], rank: int = 1, *, l2: float = 1e-3, steps: int = 200
) -> tuple[Float[Tensor, "k d"], Float[Tensor, "k d"]]:
    """INLP: fit a logistic probe of ``z``, take its unit weight, project it out; ``rank`` times."""
    x = torch.cat([hi, lo]).double()
    z = torch.cat([torch.ones(len(hi), device=x.device), torch.zeros(len(lo), device=x.device)]).double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-8)
    ws: list[Tensor] = []
    for _ in range(rank):
        xs = x.clone()
        for w in ws:  # the nullspace of the earlier probes
            xs = xs - (xs @ w)[:, None] * w
        xs = (xs - mu) / sd
        w = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
        c = torch.zeros((), dtype=torch.float64, device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS([w, c], max_iter=steps, line_search_fn="strong_wolfe")

        def closure(opt=opt, xs=xs, w=w, c=c) -> Tensor:  # bound now: the loop rebinds these names
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + c, z) + l2 * (w @ w)
            loss.backward()
            return loss

        opt.step(closure)
        raw = (w.detach() / sd).clone()  # back to the unstandardised space
        for prev in ws:
            raw = raw - (raw @ prev) * prev
        ws.append(_unit(raw))
    a = torch.stack(ws)
    return a, a.clone()


def biorthogonal(
    write: Float[Tensor, "k d"], read: Float[Tensor, "k d"]
) -> tuple[Float[Tensor, "k d"], Float[Tensor, "k d"]]:
    """Rescale/mix reads so that ``read @ write.T = I`` (the edits then compose as one projection)."""
    gram = read.double() @ write.double().T
    if torch.linalg.matrix_rank(gram) < gram.shape[0]:
        raise ValueError("The read vectors cannot measure every write vector (read . write is singular)")
    return write.double(), torch.linalg.solve(gram, read.double())


def orthogonal_to(
    write: Float[Tensor, "k d"], read: Float[Tensor, "k d"], keep: Float[Tensor, "m d"]
) -> tuple[Float[Tensor, "k d"], Float[Tensor, "k d"]]:
    """Write vectors made orthogonal to the rows of ``keep`` (the edit no longer moves x along them)."""
    q, _ = torch.linalg.qr(keep.double().T)  # [d, m] orthonormal basis of what must survive
    w = write.double() - (write.double() @ q) @ q.T
    norms = w.norm(dim=1, keepdim=True)
    if (norms < 1e-6).any():
        raise ValueError("The spurious direction lies inside the causal one: nothing is left after orthogonalising")
    return biorthogonal(w / norms, read.double())
