"""saekit: sparse autoencoders and k-sparse codebooks on a frozen model's activations.

The pipeline, one module each: `models` (load a frozen model, hook names) → `text`
(documents → token sequences) → `harvest` → `store` (HDF5 activation store) → `train`
(with `dictionaries/`) → `splice` (loss recovered) → `analysis/`.  `toy/` is the
finite-state-machine task with ground truth.  `metrics` defines every number reported.
"""

__version__ = "0.1.0"


def load(path):
    """Load any dictionary folder (saekit, SAELens or sparsify format), ready to encode/decode."""
    from saekit.interop import load as _load

    return _load(path)
