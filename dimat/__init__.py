"""dimat: decentralized merge-and-train.

Flow of a run, one module each: config -> data (partition) -> models -> train -> transport (exchange)
-> merge -> evaluate -> checkpoint.
"""

__version__ = "0.1.0"

__all__ = ["Node", "MergeResult", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `dimat --help` does not pay for importing torch.
    if name in ("Node", "MergeResult"):
        from dimat import node

        return getattr(node, name)
    raise AttributeError(f"module 'dimat' has no attribute {name!r}")
