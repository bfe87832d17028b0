"""dimat: decentralized merge-and-train.

Flow of a run, one module each: config -> data (partition) -> models -> train -> transport (exchange)
-> merge -> evaluate -> checkpoint.
"""

__version__ = "0.1.0"
