"""How one weight bucket travels from its sender (learner rank 0, or the online PRM's trainer replica) to
the receivers (rollout workers, the other PRM replicas): the `WeightTransport` seam under
`rlloop.distributed.weight_sync`'s bucketed, versioned sync.

A bucket is a dict of named numpy arrays (whatever the sender chooses to send: every weight, or only a
LoRA adapter's). The sender turns it into a *payload*, a small picklable value that Ray passes to each
receiver's `load_weight_bucket` call; the receiver turns the payload back into arrays. Versions, staging
(a half-updated model is never served) and timeouts stay in weight_sync.py: a transport only moves
bytes.

- `object_store`: the payload is the arrays themselves, the sender's Ray return value: stored once in
  the object store, mapped zero-copy by every receiver on the node (Ray's shared memory), copied over the
  network to other nodes.
- `shm` (same node): the sender writes the bucket once into a file under /dev/shm; the payload is its
  path and layout; receivers `np.memmap` it read-only (no copy until the engine loads the weights). The
  sender keeps the current and the previous version's files (two slots per bucket, overwritten in turn).
- `collective`: a torch.distributed group of the sender (rank 0) and every receiver, formed by the
  controller after the actors start (`CollectiveGroup`) and formed again, as a new generation, after a
  receiver restarts. The payload is only a ticket; the receiver's call waits in the group's broadcast
  for the bucket's header (names, shapes) and then its bytes. gloo on CPU, NCCL on GPU (receivers get
  CUDA tensors, copied to host arrays for today's numpy engines).
- `cuda_ipc` (GPU, same GPU or node): the sender keeps the bucket as one CUDA tensor and sends CUDA IPC
  handles (torch's own sharing reduction); receivers open them without a copy. Exercised only on a GPU
  machine (benchmarks/gpu_check.sh); refused without CUDA.

`resolve_transport` picks one for `cluster.weight_transport` (auto: on GPUs cuda_ipc when every
receiver is on the sender's node, else collective over NCCL; on CPU the object store, which on one node
is shared memory already: measured no slower than shm or gloo there, benchmarks/RESULTS.md) and the
controller logs the choice.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

TRANSPORTS = ("auto", "object_store", "shm", "collective", "cuda_ipc")
SHM_DIR = "/dev/shm"


class TransportError(RuntimeError):
    """A transport could not be used or failed; the message names the transport and the reason."""


# ---------------------------------------------------------------- layout: named arrays <-> one buffer


@dataclass(frozen=True)
class Layout:
    """Where each named array lies in one flat byte buffer: (name, dtype, shape, offset) in order, and
    the buffer's size. Offsets are 64-byte aligned so every view is aligned for its dtype."""

    entries: tuple[tuple[str, str, tuple[int, ...], int], ...]
    nbytes: int

    @classmethod
    def of(cls, arrays: dict[str, np.ndarray]) -> Layout:
        entries, offset = [], 0
        for name, value in arrays.items():
            value = np.asarray(value)
            entries.append((name, value.dtype.str, tuple(int(s) for s in value.shape), offset))
            offset += -(-value.nbytes // 64) * 64
        return cls(tuple(entries), offset)

    def to_json(self) -> list:
        return [[list(e[:2]) + [list(e[2]), e[3]] for e in self.entries], self.nbytes]

    @classmethod
    def from_json(cls, data: list) -> Layout:
        entries, nbytes = data
        return cls(
            tuple((str(n), str(d), tuple(int(x) for x in shape), int(o)) for n, d, shape, o in entries),
            int(nbytes),
        )

    def pack(self, arrays: dict[str, np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
        """The arrays copied into one uint8 buffer (`out`, or a new one) of `self.nbytes`."""
        buf = np.empty(self.nbytes, dtype=np.uint8) if out is None else out
        for name, dtype, _shape, offset in self.entries:
            value = np.ascontiguousarray(arrays[name], dtype=np.dtype(dtype))
            buf[offset : offset + value.nbytes] = value.reshape(-1).view(np.uint8)
        return buf

    def unpack(self, buf: np.ndarray) -> dict[str, np.ndarray]:
        """Views of `buf` (no copy), one per name."""
        out = {}
        for name, dtype, shape, offset in self.entries:
            dt = np.dtype(dtype)
            count = int(np.prod(shape)) if shape else 1
            out[name] = buf[offset : offset + count * dt.itemsize].view(dt).reshape(shape)
        return out


# ---------------------------------------------------------------- payloads (what Ray carries per bucket)


@dataclass(frozen=True)
class ShmPayload:
    """A bucket written to a file under /dev/shm by the sender."""

    path: str
    layout: Layout


@dataclass(frozen=True)
class CollectiveTicket:
    """Receive the next bucket from the weight group of this generation (header, then bytes)."""

    generation: int


@dataclass(frozen=True)
class CudaIpcPayload:
    """A bucket as one CUDA byte tensor shared by IPC handle (torch's reduce_tensor), and its layout."""

    handle: Any
    layout: Layout


@dataclass(frozen=True)
class GroupSpec:
    """One generation of a collective weight group: rank 0 (the sender) serves a TCPStore at
    host:port; `size` members; backend gloo or nccl."""

    host: str
    port: int
    size: int
    generation: int
    backend: str
    timeout_s: float


# ---------------------------------------------------------------- the endpoint inside each actor


@dataclass
class Endpoint:
    """One actor's side of every transport: sends (sender) or receives (receiver) buckets. Held by
    `ActorCore.weight_endpoint`, so the learner actor, rollout workers and PRM replicas share it."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    group: Any = None
    spec: GroupSpec | None = None
    rank: int = -1
    shm_files: dict[int, list[str]] = field(default_factory=dict)  # version -> files written
    ipc_keep: dict[int, list[Any]] = field(default_factory=dict)  # version -> CUDA tensors shared

    # ----- collective group
    def join(self, spec: GroupSpec, rank: int) -> int:
        """Join generation `spec.generation` of the weight group as `rank` (blocks until every member
        joined or the timeout); leaves an older generation first. Returns the rank."""
        import torch.distributed as dist

        self.leave()
        timeout = datetime.timedelta(seconds=spec.timeout_s)
        store = dist.TCPStore(
            spec.host, spec.port, spec.size, rank == 0, timeout=timeout, wait_for_workers=False
        )
        prefixed = dist.PrefixStore(f"rlloop-weights/{spec.generation}/", store)
        if spec.backend == "nccl":
            import torch

            torch.cuda.set_device(0)  # Ray's CUDA_VISIBLE_DEVICES makes the actor's GPU device 0
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            group = dist.ProcessGroupNCCL(prefixed, rank, spec.size, options)
        elif spec.backend == "gloo":
            group = dist.ProcessGroupGloo(prefixed, rank, spec.size, timeout)
        else:
            raise TransportError(f"weight group: unknown backend {spec.backend!r} (gloo or nccl)")
        self._store, self.group, self.spec, self.rank = store, group, spec, rank
        self._broadcast(self._tensor(np.zeros(1, dtype=np.int64)))  # every member is there
        return rank

    def leave(self) -> None:
        self.group, self.spec, self.rank = None, None, -1
        self._store = None

    def _tensor(self, array: np.ndarray) -> Any:
        import torch

        t = torch.from_numpy(array)
        return t.cuda() if self.spec is not None and self.spec.backend == "nccl" else t

    def _broadcast(self, tensor: Any) -> Any:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([tensor], opts).wait()
        return tensor

    # ----- sender
    def send(self, transport: str, arrays: dict[str, np.ndarray], version: int, index: int) -> Any:
        """The payload of bucket `index` of `version` for `transport` (collective: broadcast it now)."""
        if transport == "object_store":
            return arrays
        layout = Layout.of(arrays)
        if transport == "shm":
            free = shutil.disk_usage(SHM_DIR).free
            if free < 2 * layout.nbytes:  # writing past a full tmpfs kills the writer with SIGBUS
                raise TransportError(
                    f"cluster.weight_transport=shm: {SHM_DIR} has {free / 2**20:.0f} MiB free, a bucket of "
                    f"{layout.nbytes / 2**20:.0f} MiB needs twice that (two versions are kept); enlarge "
                    f"{SHM_DIR} (docker --shm-size) or use object_store / collective"
                )
            # two slots per bucket, by version parity: version v overwrites v-2's file in place (its pages
            # are already there: a fresh file would fault in and zero every page first), while v-1's stays
            # whole for a worker restarted meanwhile. A sync starts only once every worker loaded the last.
            if not self.shm_files:
                remove_orphan_files()
            path = os.path.join(SHM_DIR, f"rlloop-{self.run_id}-{os.getpid()}-s{version % 2}-b{index}")
            size = max(layout.nbytes, 1)
            reuse = os.path.exists(path) and os.path.getsize(path) == size
            buf = np.memmap(path, dtype=np.uint8, mode="r+" if reuse else "w+", shape=(size,))
            layout.pack(arrays, buf[: layout.nbytes])
            del buf
            self.shm_files.setdefault(version, []).append(path)
            self._drop_old(version)
            return ShmPayload(path, layout)
        if transport == "collective":
            if self.group is None:
                raise TransportError("collective weight send: this sender is in no weight group")
            # plain JSON, not pickle: the receiver never unpickles bytes that came over a socket
            header = np.frombuffer(json.dumps([version, index, layout.to_json()]).encode(), dtype=np.uint8)
            self._broadcast(self._tensor(np.array([header.size], dtype=np.int64)))
            self._broadcast(self._tensor(header.copy()))
            self._broadcast(self._tensor(layout.pack(arrays)))
            return CollectiveTicket(self.spec.generation)
        if transport == "cuda_ipc":
            import torch
            from torch.multiprocessing.reductions import reduce_tensor

            if not torch.cuda.is_available():
                raise TransportError("cuda_ipc weight send: no CUDA device in the sender")
            buf = torch.from_numpy(layout.pack(arrays)).cuda()
            self.ipc_keep.setdefault(version, []).append(buf)  # alive while receivers may open it
            self._drop_old(version)
            return CudaIpcPayload(reduce_tensor(buf), layout)
        raise TransportError(f"unknown weight transport {transport!r}; choose one of {list(TRANSPORTS[1:])}")

    def _drop_old(self, version: int) -> None:
        """Keep the files / CUDA buffers of this version and the one before (a receiver restarted while
        the previous sync is confirmed may still open it); free older ones (a file that the slot of a
        kept version reuses stays)."""
        keep = {p for v, paths in self.shm_files.items() if v >= version - 1 for p in paths}
        for v in [v for v in self.shm_files if v < version - 1]:
            for path in self.shm_files.pop(v):
                if path in keep:
                    continue
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        for v in [v for v in self.ipc_keep if v < version - 1]:
            del self.ipc_keep[v]

    def close(self) -> None:
        """Delete every shm file this endpoint wrote (actor shutdown)."""
        self._drop_old(1 << 62)

    # ----- receiver
    def receive(self, payload: Any) -> dict[str, np.ndarray]:
        """The arrays of a bucket from its payload (any transport's)."""
        if isinstance(payload, dict):
            return payload
        if isinstance(payload, ShmPayload):
            buf = np.memmap(payload.path, dtype=np.uint8, mode="r", shape=(max(payload.layout.nbytes, 1),))
            return payload.layout.unpack(buf)
        if isinstance(payload, CollectiveTicket):
            if self.group is None or self.spec is None or self.spec.generation != payload.generation:
                have = None if self.spec is None else self.spec.generation
                raise TransportError(
                    f"collective weight receive: ticket of group generation {payload.generation}, this "
                    f"actor is in generation {have}"
                )
            size = self._broadcast(self._tensor(np.zeros(1, dtype=np.int64)))
            header = self._broadcast(self._tensor(np.zeros(int(size.cpu()[0]), dtype=np.uint8)))
            layout = Layout.from_json(json.loads(header.cpu().numpy().tobytes())[2])
            buf = self._broadcast(self._tensor(np.empty(layout.nbytes, dtype=np.uint8)))
            return layout.unpack(buf.cpu().numpy())
        if isinstance(payload, CudaIpcPayload):
            rebuild, args = payload.handle
            buf = rebuild(*args)
            return payload.layout.unpack(buf.cpu().numpy())
        raise TransportError(f"weight payload of unknown kind {type(payload).__name__}")


def remove_orphan_files() -> None:
    """Delete rlloop's /dev/shm weight files whose writer (the pid in the name) is gone: a learner killed
    without its shutdown (a crash, a test's ray.kill) leaves its files behind."""
    import glob

    for path in glob.glob(os.path.join(SHM_DIR, "rlloop-*-*-*-b*")):
        try:
            pid = int(os.path.basename(path).split("-")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        except (ValueError, IndexError, PermissionError):  # not ours, or another user's live process
            continue


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- controller side


def resolve_transport(name: str, *, sender_node: str, receiver_nodes: list[str], gpus: bool) -> str:
    """The transport `cluster.weight_transport=name` means here. auto: with GPUs, cuda_ipc when every
    receiver shares the sender's node, else collective (NCCL); without, object_store (on one node Ray's
    object store is shared memory read zero-copy; on this project's CPU machines neither shm nor a gloo
    broadcast beat it, benchmarks/RESULTS.md "Weight sync"). A named transport that cannot work here
    (shm across nodes, cuda_ipc without GPUs) is an error naming the key."""
    same_node = all(node == sender_node for node in receiver_nodes)
    if name not in TRANSPORTS:
        raise TransportError(f"cluster.weight_transport={name!r}: unknown; choose one of {list(TRANSPORTS)}")
    if name == "auto":
        return ("cuda_ipc" if same_node else "collective") if gpus else "object_store"
    if name == "shm" and not same_node:
        raise TransportError(
            f"cluster.weight_transport=shm: receivers on nodes {sorted(set(receiver_nodes))} but the sender "
            f"on {sender_node}; shared memory needs one node (use collective or object_store)"
        )
    if name == "cuda_ipc" and not (gpus and same_node):
        raise TransportError(
            "cluster.weight_transport=cuda_ipc needs GPU roles on the sender's node "
            f"(GPUs: {gpus}, one node: {same_node}); use collective or shm"
        )
    return name


class CollectiveGroup:
    """The controller's handle on a collective weight group: member 0 is the sender, then the receivers.
    `form` (again) starts a new generation; `stale` marks that a member restarted since."""

    def __init__(self, backend: str, timeout_s: float) -> None:
        self.backend, self.timeout_s = backend, float(timeout_s)
        self.generation = 0
        self.stale = True

    def form(self, sender: Any, receivers: list[Any]) -> None:
        """Every member joins a new generation (concurrent Ray calls; the sender hosts the store)."""
        import ray

        host, port = ray.get(
            [sender.weight_node_ip.remote(), sender.weight_free_port.remote()], timeout=self.timeout_s
        )
        self.generation += 1
        spec = GroupSpec(host, int(port), 1 + len(receivers), self.generation, self.backend, self.timeout_s)
        t0 = time.perf_counter()
        refs = [m.weight_join.remote(spec, rank) for rank, m in enumerate([sender, *receivers])]
        try:
            ray.get(refs, timeout=self.timeout_s + 10)
        except Exception as err:
            raise TransportError(
                f"collective weight group (generation {self.generation}, {spec.size} members, "
                f"{self.backend}) did not form: {err}"
            ) from err
        self.stale = False
        logger.info(
            "collective weight group generation %d formed: %d members, %s, %s:%d, %.2f s",
            self.generation, spec.size, self.backend, host, port, time.perf_counter() - t0,
        )  # fmt: skip
