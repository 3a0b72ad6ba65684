"""A compile-time check that no compiled step reads a state tensor after the graph has written it.

Inductor turns in-place updates of graph inputs (the step's state: cache length, window, pool) into a functional
graph whose writes all come last, then removes "no-op" copies (`remove_noop_ops`: a `clone`, a same-shape
`view`, a functional `copy`). A copy of one state's OLD value that the code writes into another state
(`cached = length.clone(); length.copy_(cached + n); start.copy_(cached)`) then reads the state itself, after
its own write: `start` gets the NEW length. Seen with torch 2.11 and 2.13, on every device (it made a compiled
2-rank team with kv_sync=gather write the winner's KV entries at the wrong slots). The check runs as inductor's
`post_grad_custom_post_pass`, after noop removal and before reinplacing, where every write to an input is still
one of the trailing copies, so any read of an input after a write to it is such a stale read.
"""
from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files


class StaleStateRead(RuntimeError):
    """A compiled graph would read a state tensor's new value where the code asked for its old one."""


class StaleReadCheck(CustomGraphPass):
    """Raises StaleStateRead (so compiling fails, and the caller runs the step eagerly) when a graph reads an
    input after writing it."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        problem = stale_read(graph)
        if problem:
            raise StaleStateRead(problem)

    def uuid(self):
        return get_hash_for_files((__file__,))


def stale_read(graph: torch.fx.Graph) -> str | None:
    """A description of the first read of a graph input after a write to it, or None."""
    written: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        target = _written_input(node)
        for arg in node.all_input_nodes:
            source = _input_under(arg)
            if source is not None and source in written and source is not target:
                return (f"a compiled step would read a state tensor after writing it, at `{_source_line(node)}` "
                        f"(after `{_source_line(written[source])}`)")
        if target is not None:
            written.setdefault(target, node)
    return None


def _source_line(node: torch.fx.Node) -> str:
    """The line of Python that made `node` (the last code line of its stack trace)."""
    lines = [line.strip() for line in (node.meta.get("stack_trace") or "").splitlines()]
    code = [line for line in lines if line and not line.startswith(("File ", "^", "~"))]
    return code[-1] if code else node.format_node()


def _written_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The graph input that `node` writes in place (through views), if any."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    for i, argument in enumerate(schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write and i < len(node.args):
            return _input_under(node.args[i])
    return None


def _input_under(value) -> torch.fx.Node | None:
    """The graph input that `value` is, or is a view of (a chain of view ops), or None."""
    while isinstance(value, torch.fx.Node) and value.op == "call_function":
        schema = getattr(value.target, "_schema", None)
        aliases = schema is not None and schema.returns and schema.returns[0].alias_info is not None and \
            not schema.returns[0].alias_info.is_write
        if not aliases or not value.args:
            return None
        value = value.args[0]
    return value if isinstance(value, torch.fx.Node) and value.op == "placeholder" else None
