"""RFC 9162 §2.1 Merkle trees: hashing, roots, inclusion and consistency proofs.

The tree over ``n`` leaves splits at the largest power of two smaller than ``n``; a leaf hashes
as ``SHA-256(0x00 || data)``, an interior node as ``SHA-256(0x01 || left || right)``, and the
empty tree as ``SHA-256("")``.

Proofs are built from *complete subtrees*: the node at ``(level, index)`` covers the leaves
``[index * 2**level, (index + 1) * 2**level)``. A store that keeps every complete-subtree hash
(see :class:`Frontier`, which yields them as leaves are appended) answers any proof with
O(log n) look-ups: :func:`inclusion_plan` and :func:`consistency_plan` say which nodes a proof
needs, and :func:`assemble` turns the fetched hashes into the proof. The verifiers are the
RFC 9162 §2.1.3.2 and §2.1.4.2 algorithms, with the policy of docs/spec.md §3: hashes must be 32
bytes, an inclusion index must be below the tree size, and a consistency proof from size 0 is
refused.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence

from ledger.errors import ProofError

try:  # the same hashes, compiled where the build could (setup.py)
    from ledger import _speedups
except ImportError:  # pragma: no cover - a build without a C compiler
    _speedups = None  # type: ignore[assignment]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

NodeId = tuple[int, int]
"""A complete subtree ``(level, index)``: leaves ``[index << level, (index + 1) << level)``."""

ProofPlan = list[list[NodeId]]
"""For each proof hash, the complete subtrees it is made of, left to right (:func:`assemble`)."""


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(b"\x01" + left + right).digest()


_DIGEST = operator.methodcaller("digest")
_SHA256 = hashlib.sha256
_NODE = b"\x01"


def leaf_hashes(datas: Iterable[bytes]) -> list[bytes]:
    """:func:`leaf_hash` of each, with no Python code run per leaf."""
    if _speedups is not None:
        return _speedups.leaf_hashes(list(datas))
    return list(map(_DIGEST, map(hashlib.sha256, map(b"\x00".__add__, datas))))


def pair_hashes(nodes: list[bytes]) -> list[bytes]:
    """:func:`node_hash` of each pair of ``nodes`` (of even length): ``nodes[0]`` with
    ``nodes[1]``, ``nodes[2]`` with ``nodes[3]``, ..., with no Python code run per node."""
    if _speedups is not None:
        return _speedups.node_hashes(nodes)
    return list(
        map(_DIGEST, map(_SHA256, map(bytes.__add__, map(_NODE.__add__, nodes[0::2]), nodes[1::2])))
    )


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over the given leaf hashes, by the definition (O(n); the reference for tests)."""
    n = len(leaf_hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaf_hashes[0]
    k = _split(n)
    return node_hash(root_of(leaf_hashes[:k]), root_of(leaf_hashes[k:]))


def range_nodes(begin: int, end: int) -> list[NodeId]:
    """The complete subtrees whose right fold is MTH(D[begin:end]), left to right.

    Valid for every range that is a node of an RFC 9162 tree (``begin`` is a multiple of a power
    of two at least ``end - begin``): the range splits by the binary digits of its size, the
    largest first, and MTH is ``H(p0, H(p1, ... H(pk-1, pk)))``.
    """
    nodes: list[NodeId] = []
    size = end - begin
    position = begin
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            nodes.append((level, position >> level))
            position += 1 << level
    return nodes


def assemble(plan: ProofPlan, lookup: Callable[[NodeId], bytes]) -> list[bytes]:
    """Turn a proof plan into proof hashes, folding each element's subtrees from the right."""
    proof = []
    for parts in plan:
        digest = lookup(parts[-1])
        for node in reversed(parts[:-1]):
            digest = node_hash(lookup(node), digest)
        proof.append(digest)
    return proof


def plan_nodes(plan: ProofPlan) -> set[NodeId]:
    """Every complete subtree a plan needs, for fetching them in one query."""
    return {node for parts in plan for node in parts}


def inclusion_plan(index: int, size: int) -> ProofPlan:
    """What PATH(index, D[size]) (RFC 9162 §2.1.3.1) is made of, leaf side first."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not below tree size {size}")
    plan: ProofPlan = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index - lo < k:
            plan.append(range_nodes(lo + k, hi))
            hi = lo + k
        else:
            plan.append(range_nodes(lo, lo + k))
            lo = lo + k
    plan.reverse()
    return plan


def consistency_plan(first: int, second: int) -> ProofPlan:
    """What PROOF(first, D[second]) (RFC 9162 §2.1.4.1) is made of."""
    if not 0 < first <= second:
        raise ProofError(f"no consistency proof from size {first} to size {second}")
    plan: ProofPlan = []
    lo, hi, m, complete = 0, second, first, True
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            plan.append(range_nodes(lo + k, hi))
            hi = lo + k
        else:
            plan.append(range_nodes(lo, lo + k))
            m -= k
            lo = lo + k
            complete = False
    if not complete:
        plan.append(range_nodes(lo, hi))
    plan.reverse()
    return plan


def _check_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} is {len(value)} bytes, not {HASH_SIZE}")


def root_from_inclusion_proof(leaf: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """The root implied by an inclusion proof (RFC 9162 §2.1.3.2 steps 1-4)."""
    if index < 0 or index >= size:
        raise ProofError(f"leaf index {index} is not below tree size {size}")
    _check_hash(leaf, "leaf hash")
    fn, sn, r = index, size - 1, leaf
    for position, p in enumerate(proof):
        _check_hash(p, f"proof hash {position}")
        if sn == 0:
            raise ProofError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the tree is deep")
    return r


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Raise :class:`ProofError` unless ``proof`` shows leaf ``index`` in the tree ``root``."""
    _check_hash(root, "root")
    if root_from_inclusion_proof(leaf, index, size, proof) != root:
        raise ProofError(f"inclusion proof for leaf {index} does not lead to the root")


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> None:
    """Raise :class:`ProofError` unless ``proof`` shows tree ``first`` is a prefix of ``second``.

    RFC 9162 §2.1.4.2, with equal sizes requiring an empty proof and equal roots.
    """
    _check_hash(first_root, "first root")
    _check_hash(second_root, "second root")
    for position, p in enumerate(proof):
        _check_hash(p, f"proof hash {position}")
    if first <= 0:
        raise ProofError(f"a consistency proof from tree size {first} proves nothing")
    if first > second:
        raise ProofError(f"tree size {first} is larger than tree size {second}")
    if first == second:
        if proof:
            raise ProofError("a consistency proof between equal sizes must be empty")
        if first_root != second_root:
            raise ProofError("roots of equal tree sizes differ")
        return
    if not proof:
        raise ProofError("consistency proof is empty")
    path = list(proof)
    if first & (first - 1) == 0:  # an exact power of two: the old root is a proof node
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is shorter than the tree is deep")
    if fr != first_root:
        raise ProofError(f"consistency proof does not lead to the root of tree size {first}")
    if sr != second_root:
        raise ProofError(f"consistency proof does not lead to the root of tree size {second}")


class Frontier:
    """The right edge of a growing tree: one complete-subtree hash per 1-bit of its size.

    :meth:`append` adds a leaf hash and returns the hashes of the complete subtrees that leaf
    completes, level 0 (the leaf itself) upwards; leaf ``i`` completes ``1 + t`` of them, where
    ``t`` counts the trailing 1-bits of ``i``. Node ``(level, j)`` is therefore completed by leaf
    ``(j + 1) * 2**level - 1``, at position ``level`` of what that append returned — which is how
    the store keeps every complete subtree without a table of its own. :meth:`root` is MTH of the
    leaves so far, in O(log n).
    """

    __slots__ = ("_hashes", "size")

    def __init__(self, size: int = 0, hashes: Iterable[bytes] = ()) -> None:
        self.size = size
        self._hashes = list(hashes)  # largest subtree first, one per 1-bit of size
        if len(self._hashes) != size.bit_count():
            raise ProofError(f"a frontier of size {size} has {size.bit_count()} hashes")

    @classmethod
    def plan(cls, size: int) -> list[NodeId]:
        """The complete subtrees a frontier of ``size`` is made of, largest first."""
        return range_nodes(0, size)

    @property
    def hashes(self) -> list[bytes]:
        return list(self._hashes)

    def append(self, leaf: bytes) -> list[bytes]:
        completed = [leaf]
        digest = leaf
        index = self.size
        while index & 1:
            digest = node_hash(self._hashes.pop(), digest)
            completed.append(digest)
            index >>= 1
        self._hashes.append(digest)
        self.size += 1
        return completed

    def extend(self, leaves: list[bytes]) -> dict[int, tuple[int, list[bytes]]]:
        """:meth:`append` every leaf, a level of the tree at a time: each level's pairs are
        hashed at once (:func:`pair_hashes`), with no Python code run per node.

        Returns the complete subtrees above the leaves that these leaves completed:
        ``{level: (index of the first, their hashes)}``, levels from 1.
        """
        completed: dict[int, tuple[int, list[bytes]]] = {}
        size = self.size
        # level -> the complete subtree on the right edge at that level
        edge = {lvl: h for (lvl, _), h in zip(range_nodes(0, size), self._hashes, strict=True)}
        nodes, first, level = list(leaves), size, 0
        while nodes:
            # (new lists, not changes in place: ``completed`` holds the previous level's)
            if first & 1:  # the first node's left sibling is on the edge
                nodes = [edge.pop(level), *nodes]
                first -= 1
            if len(nodes) & 1:  # the last node has no right sibling yet
                edge[level] = nodes[-1]
                nodes = nodes[:-1]
            nodes = pair_hashes(nodes)
            first >>= 1
            level += 1
            if nodes:
                completed[level] = (first, nodes)
        self.size = size + len(leaves)
        self._hashes = [edge[level] for level in sorted(edge, reverse=True)]
        return completed

    def root(self) -> bytes:
        if not self._hashes:
            return EMPTY_ROOT
        digest = self._hashes[-1]
        for left in reversed(self._hashes[:-1]):
            digest = node_hash(left, digest)
        return digest

    def copy(self) -> Frontier:
        return Frontier(self.size, self._hashes)


def node_for_lookup(nodes: Mapping[NodeId, bytes]) -> Callable[[NodeId], bytes]:
    """A lookup for :func:`assemble` over fetched nodes, with a clear error for a missing one."""

    def lookup(node: NodeId) -> bytes:
        try:
            return nodes[node]
        except KeyError:
            raise ProofError(f"Merkle node {node} is not stored") from None

    return lookup
