"""Reading YAML safely: PyYAML's safe loader, refusing duplicate keys and alias bombs.

A scenario's mapping is validated key by key, so a duplicate key (PyYAML keeps the last one
silently) would be a setting that is silently ignored; an alias bomb (``&a [x, x]``, ``&b [*a,
*a]``, ... nine levels) builds a small graph that expands to 10^9 values in any traversal.
"""

from __future__ import annotations

from typing import Any

import yaml

from fedsim.errors import ConfigError

MAX_YAML_NODES = 1_000_000
"""Most YAML nodes a document may expand to, aliases counted at every use (alias bombs)."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader refusing duplicate keys (YAML 1.2 forbids them; PyYAML keeps the last)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first != key_node.start_mark.line + 1:
                raise ConfigError(f"duplicate key at line {key_node.start_mark.line + 1} (first at "
                                  f"line {first}; YAML keeps only one)", key=str(key))
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: Any, limit: int) -> int:
    """Nodes of the YAML graph counted at every use (an alias of a list counts the whole list),
    stopping once above `limit`; memoised per node, so an alias bomb costs its distinct nodes."""
    memo: dict[int, int] = {}

    def size(n: Any) -> int:
        if id(n) in memo:
            return memo[id(n)]
        total = 1
        if isinstance(n, yaml.SequenceNode):
            for child in n.value:
                total += size(child)
                if total > limit:
                    break
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                total += size(k) + size(v)
                if total > limit:
                    break
        memo[id(n)] = total
        return total
    return size(node)


def load_yaml_text(text: str, file: str | None = None) -> Any:
    """YAML `text` as Python objects: duplicate keys and alias bombs are ConfigErrors."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = _expanded_size(node, MAX_YAML_NODES)
        if n > MAX_YAML_NODES:
            raise ConfigError("the YAML expands to too many values (aliases of aliases?)", file=file,
                              value=f"> {MAX_YAML_NODES} nodes", allowed=f"<= {MAX_YAML_NODES}")
        return loader.construct_document(node)
    except ConfigError as err:
        raise err.at(file=file) from None
    finally:
        loader.dispose()
