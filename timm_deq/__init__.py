"""timm_deq: multiscale deep equilibrium models (MDEQ) registered with timm.

The models and the training entry points are built on :mod:`deq_core`; importing this package
is what makes them visible to ``timm.create_model`` (timm has no plugin discovery).
"""
