"""CPPN genomes: small networks over (x, y, r, bias) that paint an image at any resolution.

Stanley 2007, "Compositional pattern producing networks"; used as the indirect encoding of
Nguyen, Yosinski, Clune, "Deep Neural Networks are Easily Fooled", CVPR 2015, Sec. 3.2.
A genome is a feed-forward DAG of nodes with sine, sigmoid, Gaussian or linear activations; the
inputs are each pixel's coordinates ``x, y`` in [-1, 1], its distance to the centre ``r`` and a
constant bias. Output nodes (one per channel) use a sigmoid, so pixels lie in [0, 1]. The
topology grows by NEAT-style mutation: add a node (split a connection), add a connection,
change weights, change a hidden node's activation.

Written by hand: the NEAT libraries for Python (neat-python) evaluate one pixel at a time in
Python; here a genome renders all pixels in one vectorised pass in torch, and
:func:`render` draws a whole population at once (one pass per genome over the shared
coordinate grid). Genomes are plain data (``to_dict``/``from_dict``, JSON-friendly; no pickle).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from guard.core.validation import check_float, check_int

__all__ = [
    "ACTIVATIONS",
    "Genome",
    "MutationRates",
    "random_genome",
    "complete_connections",
    "mutate",
    "render",
    "coordinate_grid",
]

ACTIVATIONS = ("sine", "sigmoid", "gaussian", "linear")
NUM_INPUTS = 4  # x, y, r, bias


def _activate(name: str, s: torch.Tensor) -> torch.Tensor:
    if name == "sine":
        return torch.sin(s)
    if name == "sigmoid":
        return torch.sigmoid(s)
    if name == "gaussian":
        return torch.exp(-0.5 * s * s)
    if name == "linear":
        return s
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}.")


@dataclass
class Genome:
    """A CPPN: nodes in evaluation order and weighted connections from earlier to later nodes.

    Node ids ``0..3`` are the inputs (x, y, r, bias), ``4..4+channels-1`` the outputs; hidden
    nodes get fresh ids. ``order`` lists every node id in evaluation order (inputs first,
    outputs last); a connection always goes from an earlier to a later node, so the graph stays
    acyclic.
    """

    channels: int
    activations: dict[int, str]
    order: list[int]
    connections: list[list[float]] = field(default_factory=list)  # [src, dst, weight]
    next_id: int = 0

    @property
    def num_hidden(self) -> int:
        return len(self.order) - NUM_INPUTS - self.channels

    def outputs(self) -> list[int]:
        return list(range(NUM_INPUTS, NUM_INPUTS + self.channels))

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "activations": {str(k): v for k, v in self.activations.items()},
            "order": list(self.order),
            "connections": [[int(a), int(b), float(w)] for a, b, w in self.connections],
            "next_id": self.next_id,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Genome:
        g = cls(
            channels=int(d["channels"]),
            activations={int(k): str(v) for k, v in d["activations"].items()},
            order=[int(i) for i in d["order"]],
            connections=[[int(a), int(b), float(w)] for a, b, w in d["connections"]],
            next_id=int(d["next_id"]),
        )
        g.validate()
        return g

    def validate(self) -> None:
        pos = {n: i for i, n in enumerate(self.order)}
        if len(pos) != len(self.order) or set(pos) != set(self.activations):
            raise ValueError("genome order and activations must list the same unique node ids.")
        for a, b, _ in self.connections:
            if int(a) not in pos or int(b) not in pos or pos[int(a)] >= pos[int(b)]:
                raise ValueError(f"genome connection {int(a)}->{int(b)} does not go forward in the evaluation order.")
        for name in self.activations.values():
            if name not in ACTIVATIONS:
                raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}.")


@dataclass(frozen=True)
class MutationRates:
    """Probabilities of each mutation per child (Nguyen et al. use Picbreeder-like rates)."""

    add_node: float = 0.15
    add_connection: float = 0.3
    change_weight: float = 0.8  # per connection
    weight_sigma: float = 1.0
    change_activation: float = 0.1  # per hidden node
    # Wide weights matter: with |w| <= 4 and sigma 0.6 the sigmoid outputs stay soft and, on the
    # demo model, classes 3 and 9 stalled below 99.99% for 1,500 generations; with |w| <= 8 and
    # sigma 1 all ten classes pass within 50 generations (BENCHMARKS.md, "Attacks II").
    max_weight: float = 8.0

    def __post_init__(self) -> None:
        for name in ("add_node", "add_connection", "change_weight", "change_activation"):
            check_float(getattr(self, name), name, "MutationRates", low=0.0, high=1.0)
        check_float(self.weight_sigma, "weight_sigma", "MutationRates", low=0.0)
        check_float(self.max_weight, "max_weight", "MutationRates", low=0.0, low_open=True)


def random_genome(channels: int = 1, *, rng: np.random.Generator, hidden: int = 0, connections: int = 0) -> Genome:
    """Inputs fully connected to the outputs with N(0, 1) weights, then ``hidden`` add-node mutations,
    then ``connections`` add-connection mutations (fewer where the DAG has no free pair left).

    Extra connections help gradient refinement of a genome (:mod:`attacks.cppn_refine`): on the
    CIFAR-10 demo model, 8 random genomes with 8 hidden nodes reach at best 0.9990 for "dog"
    after 300 Adam steps (lr 0.1; 0.99925 after 4 x 500), and with 40 more connections 0.99999
    after 400 steps (lr 0.05, log-odds). Inside MAP-Elites with refinement they did not raise
    the classes at 99.99% over seeds (BENCHMARKS.md, "CPPN fooling images on CIFAR-10").
    """
    channels = check_int(channels, "channels", "random_genome", low=1)
    hidden = check_int(hidden, "hidden", "random_genome", low=0)
    connections = check_int(connections, "connections", "random_genome", low=0)
    acts = {i: "linear" for i in range(NUM_INPUTS)}
    acts.update({o: "sigmoid" for o in range(NUM_INPUTS, NUM_INPUTS + channels)})
    conns = [[i, o, float(rng.normal())] for i in range(NUM_INPUTS) for o in range(NUM_INPUTS, NUM_INPUTS + channels)]
    g = Genome(
        channels=channels,
        activations=acts,
        order=list(range(NUM_INPUTS + channels)),
        connections=conns,
        next_id=NUM_INPUTS + channels,
    )
    for _ in range(hidden):
        _add_node(g, rng)
    for _ in range(connections):
        _add_connection(g, rng)
    return g


def _add_node(g: Genome, rng: np.random.Generator) -> None:
    if not g.connections:
        return
    i = int(rng.integers(len(g.connections)))
    a, b, w = g.connections.pop(i)
    new = g.next_id
    g.next_id += 1
    g.activations[new] = ACTIVATIONS[int(rng.integers(len(ACTIVATIONS)))]
    g.order.insert(g.order.index(int(b)), new)
    # NEAT: weight 1 into the new node and the old weight out, so the function barely changes.
    g.connections.append([int(a), new, 1.0])
    g.connections.append([new, int(b), float(w)])


def _free_pairs(g: Genome) -> list[tuple[int, int]]:
    """Every (src, dst) a new connection may take: src not an output, dst not an input, src earlier, not present."""
    pos = {n: i for i, n in enumerate(g.order)}
    existing = {(int(a), int(b)) for a, b, _ in g.connections}
    outs = set(g.outputs())
    return [
        (a, b)
        for a in g.order
        if a not in outs
        for b in g.order
        if b >= NUM_INPUTS and pos[a] < pos[b] and (a, b) not in existing
    ]


def _add_connection(g: Genome, rng: np.random.Generator) -> None:
    cands = _free_pairs(g)
    if not cands:
        return
    a, b = cands[int(rng.integers(len(cands)))]
    g.connections.append([a, b, float(rng.normal())])


def complete_connections(genome: Genome) -> Genome:
    """A copy with every missing forward connection added at weight 0: the same image, more edges.

    Node order stays, so the graph stays acyclic; outputs get no outgoing edges. A zero weight
    changes nothing in :func:`render`, so this is a function-preserving growth step: what
    :func:`attacks.cppn_refine.refine_weights` (``grow=True``) does before its gradient steps, so
    that the gradient can use edges evolution has not found yet.
    """
    g = copy.deepcopy(genome)
    g.connections.extend([int(a), int(b), 0.0] for a, b in _free_pairs(g))
    return g


def mutate(genome: Genome, rng: np.random.Generator, rates: MutationRates = MutationRates()) -> Genome:
    """A mutated copy: maybe add a node, maybe add a connection, perturb weights, change activations.

    At least the weights always change, so a child differs from its parent.
    """
    g = copy.deepcopy(genome)
    if rng.random() < rates.add_node:
        _add_node(g, rng)
    if rng.random() < rates.add_connection:
        _add_connection(g, rng)
    for c in g.connections:
        if rng.random() < rates.change_weight:
            c[2] = float(np.clip(c[2] + rng.normal(0.0, rates.weight_sigma), -rates.max_weight, rates.max_weight))
    outs = set(g.outputs())
    for n in g.order[NUM_INPUTS:]:
        if n not in outs and rng.random() < rates.change_activation:
            g.activations[n] = ACTIVATIONS[int(rng.integers(len(ACTIVATIONS)))]
    return g


def coordinate_grid(
    height: int, width: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(4, H*W) rows x, y in [-1, 1], r = sqrt(x^2 + y^2) and bias 1."""
    height = check_int(height, "height", "coordinate_grid", low=1)
    width = check_int(width, "width", "coordinate_grid", low=1)
    ys = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    r = torch.sqrt(xx * xx + yy * yy)
    return torch.stack([xx.flatten(), yy.flatten(), r.flatten(), torch.ones_like(r).flatten()])


def _render_one(g: Genome, grid: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(C, H*W) image of ``g``; ``weights`` (one per connection, differentiable) replaces its own."""
    values: dict[int, torch.Tensor] = {i: grid[i] for i in range(NUM_INPUTS)}
    incoming: dict[int, list[tuple[int, Any]]] = {}
    for j, (a, b, w) in enumerate(g.connections):
        incoming.setdefault(int(b), []).append((int(a), float(w) if weights is None else weights[j]))
    zero = torch.zeros_like(grid[0])
    for n in g.order[NUM_INPUTS:]:
        ins = incoming.get(n)
        if ins:
            s = values[ins[0][0]] * ins[0][1]
            for a, w in ins[1:]:
                s = s + values[a] * w
        else:
            s = zero
        values[n] = _activate(g.activations[n], s)
    return torch.stack([values[o] for o in g.outputs()])


@torch.no_grad()
def render(
    genomes: Genome | Sequence[Genome],
    height: int,
    width: int | None = None,
    *,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] of one genome or a population, at any resolution."""
    single = isinstance(genomes, Genome)
    pop = [genomes] if single else list(genomes)
    if not pop:
        raise ValueError("genomes must hold at least one Genome; got an empty sequence.")
    width = height if width is None else width
    grid = coordinate_grid(height, width, device=device)
    channels = {g.channels for g in pop}
    if len(channels) != 1:
        raise ValueError(f"all genomes must have the same channel count; got {sorted(channels)}.")
    out = torch.stack([_render_one(g, grid) for g in pop]).view(len(pop), pop[0].channels, height, width)
    return out.clamp_(0.0, 1.0)
