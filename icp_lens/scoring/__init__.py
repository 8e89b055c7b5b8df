"""Stage 1 of the method: score every feature by the causal effect of intervening on it."""

from icp_lens.scoring.effects import Effects, InterventionSpec, probe_means

__all__ = ["Effects", "InterventionSpec", "probe_means"]
