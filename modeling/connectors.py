"""The connector registry, complete: importing this module registers every connector.

Adding a connector = one class with `@register_connector("name")` in a file of this folder,
plus its import below. Everything else (config validation, Auto loading, CLI, tests) reads
`CONNECTORS`.
"""

from .connector_base import CONNECTORS, FAMILIES, Connector, get_connector_class, register_connector
# The import order is the registry's order (preserving first, then compressing).
from .connector_projection import LinearConnector, LowRankConnector, MLPConnector  # isort: skip
from .connector_moe import MoEConnector  # isort: skip
from .connector_dense import DenseDCIConnector, DenseSCIConnector, DenseSTIConnector  # isort: skip
from .connector_pooling import AvgPoolConnector, CAbstractorConnector, LDPConnector, PixelShuffleConnector  # isort: skip
from .connector_qformer import QFormerConnector  # isort: skip

__all__ = [
    "CONNECTORS",
    "FAMILIES",
    "AvgPoolConnector",
    "CAbstractorConnector",
    "Connector",
    "DenseDCIConnector",
    "DenseSCIConnector",
    "DenseSTIConnector",
    "LDPConnector",
    "LinearConnector",
    "LowRankConnector",
    "MLPConnector",
    "MoEConnector",
    "PixelShuffleConnector",
    "QFormerConnector",
    "get_connector_class",
    "register_connector",
]
