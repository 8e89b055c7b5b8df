"""The task's causal graph, and the audit that measures the model against it.

The counterfactual method rests on a small causal story of the task::

    U (confounder: who tends to hold which job, which names appear where)
      |                 \\
      v                  v
    X_C (causal) ----> Y <-/- X_S (spurious)

``X_C`` decides the answer ``Y`` (a relation noun decides the pronoun); ``X_S`` is
correlated with ``Y`` only through the confounder ``U`` (professions are gendered in
the data, not in the task), so the task has **no** edge ``X_S -> Y``. A model has a
shortcut when its prediction depends on ``X_S`` anyway. :class:`CausalGraph` holds this
story (it prints as text and draws as a figure), and :func:`audit_model` puts numbers on its
edges for one model: the sensitivity of the prediction to each attribute (mean KL of
the answer candidates and flip rate under counterfactuals of that attribute alone), the
causal robustness ratio, and, given labelled data, the spuriousness ratio ``rho`` of
the attribute (how much of its information about ``Y`` the cause explains away).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from icp_lens.counterfactuals.audit import SpuriousnessRatio, sensitivity

__all__ = ["CausalGraph", "AuditResult", "audit_model"]


def _short(values: Sequence[str], n: int = 3) -> str:
    values = list(values)
    return ", ".join(values[:n]) + (f", ... ({len(values)})" if len(values) > n else "")


@dataclass(frozen=True)
class CausalGraph:
    """Nodes ``Y``, ``X_C``, ``X_S`` and confounders, with the task's edges and the model's measured ones.

    ``edges`` are the task's: ``(source, target)``; ``model_edges`` map an attribute node
    to the model's measured dependence on it (``{"X_S": {"kl": ..., "flip_rate": ...}}``),
    filled by :func:`audit_model`. ``str(graph)`` prints both; :meth:`draw` draws them.
    """

    label: str = "Y"
    causal: str = "X_C"
    spurious: str = "X_S"
    confounders: tuple[str, ...] = ("U",)
    descriptions: dict[str, str] = field(default_factory=dict)
    model_edges: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def nodes(self) -> tuple[str, ...]:
        return (*self.confounders, self.causal, self.spurious, self.label)

    @property
    def edges(self) -> tuple[tuple[str, str], ...]:
        """The task's edges: cause -> label, each confounder -> both attributes. No spurious -> label edge."""
        return ((self.causal, self.label), *((u, v) for u in self.confounders for v in (self.causal, self.spurious)))

    @classmethod
    def from_spec(cls, spec: Any) -> CausalGraph:
        """The graph of a :class:`~icp_lens.counterfactuals.PairSpec`: its groups' values name the nodes."""
        groups = list(spec.spurious)
        desc = {
            "X_S": "spurious: " + "; ".join(f"{g}: {_short(spec.spurious[g])}" for g in groups),
            "Y": "answer: " + " / ".join(repr(spec.answers[g]) for g in groups),
            "U": "confounder: who is usually described by which value (not in the task)",
        }
        if spec.causal:
            desc["X_C"] = "causal: " + "; ".join(f"{g}: {_short(spec.causal[g])}" for g in groups)
        return cls(descriptions=desc)

    def with_measurements(self, table: pd.DataFrame) -> CausalGraph:
        """A copy whose ``model_edges`` hold the sensitivity rows of ``table`` (``counterfactual`` spurious/causal)."""
        node = {"spurious": self.spurious, "causal": self.causal}
        edges = {
            node[r["counterfactual"]]: {"kl": float(r["kl"]), "flip_rate": float(r["flip_rate"])}
            for _, r in table.iterrows()
            if r["counterfactual"] in node
        }
        return CausalGraph(self.label, self.causal, self.spurious, self.confounders, dict(self.descriptions), edges)

    def __str__(self) -> str:
        lines = ["task graph (what should drive the answer):"]
        lines += [f"  {a} -> {b}" for a, b in self.edges]
        lines.append(f"  (no edge {self.spurious} -> {self.label}: the attribute must not matter)")
        for node in self.nodes:
            if node in self.descriptions:
                lines.append(f"  {node}: {self.descriptions[node]}")
        if self.model_edges:
            lines.append("model (measured dependence of its prediction):")
            for node, m in self.model_edges.items():
                lines.append(f"  {node} -> {self.label}_hat: KL {m['kl']:.3f}, flip rate {m['flip_rate']:.2f}")
        return "\n".join(lines)

    def draw(self, ax: Any = None) -> Any:
        """Draw the graph: task edges solid, the model's measured edges dashed and labelled. Returns the axes."""
        from icp_lens.plotting import pyplot

        plt = pyplot()
        if plt is None:
            raise ModuleNotFoundError("drawing needs matplotlib: pip install 'icp-lens[plot]'")
        if ax is None:
            _, ax = plt.subplots(figsize=(4.5, 3.2))
        pos = {self.label: (0.5, 0.0), self.causal: (0.0, 0.55), self.spurious: (1.0, 0.55)}
        for i, u in enumerate(self.confounders):
            pos[u] = (0.5 + 0.3 * (i - (len(self.confounders) - 1) / 2), 1.05)
        for a, b in self.edges:
            ax.annotate("", xy=pos[b], xytext=pos[a],
                        arrowprops={"arrowstyle": "->", "color": "#444", "shrinkA": 14, "shrinkB": 14})  # fmt: skip
        for node, m in self.model_edges.items():
            if node not in pos:
                continue
            color = "#d62728" if node == self.spurious else "#2b7bba"
            ax.annotate("", xy=pos[self.label], xytext=pos[node],
                        arrowprops={"arrowstyle": "->", "color": color, "linestyle": "--", "shrinkA": 14,
                                    "shrinkB": 14, "connectionstyle": "arc3,rad=0.25"})  # fmt: skip
            x, y = (pos[node][0] + pos[self.label][0]) / 2, (pos[node][1] + pos[self.label][1]) / 2
            ax.text(x, y - 0.08, f"model: KL {m['kl']:.2f}\nflips {m['flip_rate']:.0%}", color=color, fontsize=7.5,
                    ha="center", va="top")  # fmt: skip
        for node, (x, y) in pos.items():
            ax.text(x, y, node, ha="center", va="center", fontsize=11,
                    bbox={"boxstyle": "circle", "fc": "white", "ec": "#444"})  # fmt: skip
        ax.set_xlim(-0.3, 1.3)
        ax.set_ylim(-0.35, 1.3)
        ax.axis("off")
        ax.set_title("task graph (solid) and the model's dependence (dashed)", fontsize=9)
        return ax


@dataclass(frozen=True)
class AuditResult:
    """The audit of one model on one attribute: a table (one row per attribute), the graph, ``rho``."""

    table: pd.DataFrame
    graph: CausalGraph
    ratio: SpuriousnessRatio | None = None

    def figure(self) -> Any:
        """Sensitivity bars (KL and flip rate per attribute) beside the causal graph."""
        from icp_lens.plotting import COLORS, label_bars, pyplot, style

        plt = pyplot()
        if plt is None:
            raise ModuleNotFoundError("the audit figure needs matplotlib: pip install 'icp-lens[plot]'")
        fig, (ax_kl, ax_flip, ax_graph) = plt.subplots(1, 3, figsize=(11, 3.4),
                                                       gridspec_kw={"width_ratios": [1, 1, 1.4]})  # fmt: skip
        names = self.table["attribute"].tolist()
        colors = [COLORS["oracle"] if r == "spurious" else COLORS["after"] for r in self.table["counterfactual"]]
        ax_kl.bar(names, self.table["kl"], color=colors)
        style(ax_kl, title="sensitivity: mean KL", ylabel="KL of the answer candidates (nats)")
        label_bars(ax_kl, "{:.3f}")
        ax_flip.bar(names, self.table["flip_rate"], color=colors)
        style(ax_flip, title="flip rate", ylabel="share of predictions that change")
        ax_flip.set_ylim(0, 1.05)
        label_bars(ax_flip)
        self.graph.draw(ax_graph)
        fig.tight_layout()
        return fig


def audit_model(
    model: Any,
    tokenizer: Any,
    probes: Sequence[Any],
    *,
    graph: CausalGraph | None = None,
    ratio: SpuriousnessRatio | None = None,
    batch_size: int = 32,
) -> AuditResult:
    """Audit ``model``: one row per attribute (``X_S`` spurious, ``X_C`` causal) with its sensitivity.

    Columns: ``attribute`` (the graph node), ``counterfactual`` (spurious / causal), ``kl``,
    ``flip_rate``, ``n``, ``causal_robustness`` (``kl_causal / kl_spurious``, both rows),
    and with ``ratio`` (from :func:`~icp_lens.counterfactuals.spuriousness_ratio` on
    labelled data) ``rho``, ``rho_low``, ``rho_high`` on the spurious row. A model that
    follows the task has a large causal KL, a spurious KL near 0 and a high robustness ratio.
    """
    graph = graph or CausalGraph()
    table = sensitivity(model, tokenizer, probes, batch_size=batch_size)
    table.insert(0, "attribute", table["counterfactual"].map({"spurious": graph.spurious, "causal": graph.causal}))
    if ratio is not None:
        spur = table["counterfactual"] == "spurious"
        for column, value in (("rho", ratio.rho), ("rho_low", ratio.ci_low), ("rho_high", ratio.ci_high)):
            table[column] = float("nan")
            table.loc[spur, column] = value
    return AuditResult(table=table, graph=graph.with_measurements(table), ratio=ratio)
