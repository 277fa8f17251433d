"""Kronecker-factored EWC: curvature (``fisher``), ``[W; b]`` packing,
penalty, the optax state and pull (``state``, ``transform``), and
consolidation (``consolidate``)."""
