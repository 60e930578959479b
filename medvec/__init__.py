"""medvec: multi-hospital data-vector merging for clinical image classifiers.

Implements the data-vector method of arXiv 2408.13038 ("Improving the
Classification Effect of Clinical Images of Diseases for Multi-Source Privacy
Protection"): hospitals publish τ_h = θ_h − θ_pre and a coordinator merges
θ = θ_pre + λ·Σ τ_h.  This package is the framework-free core.
"""

__version__ = "0.1.0"
