"""kiln's intermediate representation: a graph of nodes over typed values.

A ``Graph`` is an ordered list of ``Node``s in topological order. Every ``Value`` has exactly
one producer (a node, or nothing for graph inputs, weights and constants) and knows its uses,
so rewrites are local: build the replacement, ``replace_all_uses_with``, drop what is dead.

Dimensions are ints or named symbols (``"batch"``, ``"seq"``, ``"past"``), so one graph serves
any batch size and sequence length; ``None`` is a dimension nobody could name.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

import numpy as np

from .weights import Weight

Dim = "int | str | None"


@dataclass(frozen=True)
class TensorType:
    dtype: str                 # numpy name: float32, float16, int64, int32, bool
    shape: tuple               # ints, symbol names, or None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.dtype}[{dims}]"


class Usage(NamedTuple):
    node: "Node"
    index: int


class Value:
    """An SSA value: a graph input, a weight, a constant, or a node output."""

    __slots__ = ("name", "type", "producer", "uses", "weight", "const")

    def __init__(self, name: str, type: TensorType, *, weight: Weight | None = None, const: np.ndarray | None = None):
        self.name = name
        self.type = type
        self.producer: Node | None = None
        self.uses: list[Usage] = []
        self.weight = weight
        self.const = const

    @property
    def is_weight(self) -> bool:
        return self.weight is not None

    @property
    def is_const(self) -> bool:
        return self.const is not None

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    __slots__ = ("op", "inputs", "attrs", "outputs", "name")

    def __init__(self, op: str, inputs: list, attrs: dict, outputs: list[Value], name: str = ""):
        self.op = op
        self.inputs = list(inputs)
        self.attrs = dict(attrs)
        self.outputs = outputs
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.op} {self.name}>"


class Graph:
    def __init__(self, name: str = "graph"):
        self.name = name
        self.nodes: list[Node] = []
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.weights: dict[str, Value] = {}
        self.consts: list[Value] = []
        self.meta: dict = {}          # free-form facts passes agree on (e.g. "past_length")
        self._names: set[str] = set()
        self._counter = itertools.count()

    # ---- naming -----------------------------------------------------------------------
    def fresh_name(self, hint: str = "v") -> str:
        if hint not in self._names:
            self._names.add(hint)
            return hint
        while True:
            name = f"{hint}.{next(self._counter)}"
            if name not in self._names:
                self._names.add(name)
                return name

    # ---- building ---------------------------------------------------------------------
    def add_input(self, name: str, dtype: str, shape) -> Value:
        v = Value(self.fresh_name(name), TensorType(dtype, shape))
        self.inputs.append(v)
        return v

    def add_weight(self, name: str, weight: Weight, dtype: str = "float32") -> Value:
        if name in self.weights:
            raise ValueError(f"weight {name} added twice")
        v = Value(self.fresh_name(name), TensorType(dtype, weight.shape), weight=weight)
        self.weights[v.name] = v
        return v

    def const(self, array, dtype: str | None = None, name: str = "const") -> Value:
        arr = np.asarray(array, dtype=dtype) if dtype else np.asarray(array)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        v = Value(self.fresh_name(name), TensorType(str(arr.dtype), arr.shape), const=arr)
        self.consts.append(v)
        return v

    def add_node(self, op: str, inputs: Iterable, attrs: dict | None = None, *, name: str = "",
                 output_names: list[str] | None = None, index: int | None = None) -> list[Value]:
        """Append (or insert at ``index``) a node; its output types come from the op registry."""
        from .ops import infer_types
        inputs = [self._as_value(x) for x in inputs]
        attrs = attrs or {}
        types = infer_types(op, inputs, attrs)
        hint = name or op.lower()
        names = output_names or ([hint] if len(types) == 1 else [f"{hint}.{i}" for i in range(len(types))])
        outputs = [Value(self.fresh_name(n), t) for n, t in zip(names, types)]
        node = Node(op, inputs, attrs, outputs, name=name or outputs[0].name)
        for o in outputs:
            o.producer = node
        for i, x in enumerate(inputs):
            if x is not None:
                x.uses.append(Usage(node, i))
        if index is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(index, node)
        return outputs

    def _as_value(self, x):
        if x is None or isinstance(x, Value):
            return x
        return self.const(x)

    # ---- rewriting --------------------------------------------------------------------
    def replace_all_uses_with(self, old: Value, new: Value, *, except_node: Node | None = None) -> int:
        n = 0
        for use in list(old.uses):
            if use.node is except_node:
                continue
            use.node.inputs[use.index] = new
            new.uses.append(use)
            old.uses.remove(use)
            n += 1
        self.outputs = [new if o is old else o for o in self.outputs]
        return n

    def set_input(self, node: Node, index: int, value: Value) -> None:
        old = node.inputs[index]
        if old is not None:
            old.uses.remove(Usage(node, index))
        node.inputs[index] = value
        value.uses.append(Usage(node, index))

    def remove_node(self, node: Node) -> None:
        for i, x in enumerate(node.inputs):
            if x is not None:
                x.uses.remove(Usage(node, i))
        self.nodes.remove(node)

    def prune_unused(self) -> tuple[int, int]:
        """Drop weights and constants nothing uses; returns (weights, consts) removed."""
        dead_w = [k for k, v in self.weights.items() if not v.uses and v not in self.outputs]
        for k in dead_w:
            del self.weights[k]
        before = len(self.consts)
        self.consts = [c for c in self.consts if c.uses or c in self.outputs]
        return len(dead_w), before - len(self.consts)

    def toposort(self) -> None:
        """Reorder nodes topologically, keeping the existing order where it is already valid."""
        ready = {id(v) for v in self.inputs} | {id(v) for v in self.weights.values()} | {id(v) for v in self.consts}
        pending = list(self.nodes)
        ordered: list[Node] = []
        while pending:
            progress = False
            rest = []
            for node in pending:
                if all(x is None or id(x) in ready for x in node.inputs):
                    ordered.append(node)
                    ready.update(id(o) for o in node.outputs)
                    progress = True
                else:
                    rest.append(node)
            if not progress:
                raise ValueError(f"graph {self.name} has a cycle or a dangling input at {rest[0]}")
            pending = rest
        self.nodes = ordered

    # ---- reading ----------------------------------------------------------------------
    def values(self) -> Iterable[Value]:
        yield from self.inputs
        yield from self.weights.values()
        yield from self.consts
        for n in self.nodes:
            yield from n.outputs

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items()))

    def __str__(self) -> str:
        from .irtext import to_text
        return to_text(self)


@dataclass
class ModelIR:
    """What a frontend hands to the compiler: the graph plus everything a deployment needs."""
    graph: Graph
    config: dict                      # normalised architecture config (see frontends.arch)
    weights: dict = field(default_factory=dict)   # canonical role -> Weight (what converters write)
    source: dict = field(default_factory=dict)    # format, path, sha256 ...
    tokenizer: object | None = None   # frontends.tokenizer.TokenizerSpec
    generation: dict = field(default_factory=dict)  # generation defaults (eos ids, ...)
    embedding: dict | None = None     # an embedding model's pooling (frontends.sentence_transformers)
