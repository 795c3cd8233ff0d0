"""Placeholder, replaced below."""
def qdq(X, sc, spec, seed, required=False):
    if required:
        raise RuntimeError("no kernels")
    return None
