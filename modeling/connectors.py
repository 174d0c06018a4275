"""The connector registry, complete: importing this module registers every connector.

Adding a connector = one class with `@register_connector("name")` in a file of this folder,
plus its import below. Everything else (config validation, Auto loading, CLI, tests) reads
`CONNECTORS`.
"""

from .connector_base import CONNECTORS, FAMILIES, Connector, get_connector_class, register_connector
from .connector_projection import LinearConnector, MLPConnector

__all__ = [
    "CONNECTORS",
    "FAMILIES",
    "Connector",
    "LinearConnector",
    "MLPConnector",
    "get_connector_class",
    "register_connector",
]
