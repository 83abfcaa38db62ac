"""Data parallelism over every device of every process (pure JAX).

One 1-D mesh with a ``data`` axis: train states are replicated, batches are split along it. A
step jitted over such global arrays computes BatchNorm statistics and gradients over the whole
global batch (XLA inserts the all-reduces): synchronised BatchNorm with no explicit ``pmean``.
"""

import errno
import os
import re
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from hairseg_jax import cli

DATA_AXIS = "data"
# How much longer than distributed.initialization_timeout JAX's own wait for the processes
# may take: that wait ends in a C++ abort, so initialize_distributed's own ends first.
JAX_WAIT_MARGIN_S = 60


class ShardingError(ValueError):
    """A batch size that the devices cannot split evenly, processes that cannot join, or a
    backend that cannot start."""


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Joins the other processes with ``jax.distributed.initialize`` if ``config.enabled``.

    On SLURM, Open MPI, Kubernetes and Cloud TPU the cluster is detected; elsewhere set
    ``coordinator_address`` (or ``$JAX_COORDINATOR_ADDRESS``), ``num_processes`` and
    ``process_id``. Call it before anything else touches JAX.
    """
    if not config.enabled:
        return
    name, address = "distributed.coordinator_address", config.coordinator_address
    if not address and os.environ.get("JAX_COORDINATOR_ADDRESS"):  # which JAX reads
        name, address = "$JAX_COORDINATOR_ADDRESS", os.environ["JAX_COORDINATOR_ADDRESS"]
        if coordinator_port(address) is None:
            raise ShardingError(f"{name}={address!r} must be HOST:PORT, PORT in 1-65535.")
    timeout = config.initialization_timeout
    if address and config.process_id == 0:
        check_port_free(address, name)
        logging.info("Process 0: waiting up to %d s for the others at %s.", timeout, address)
    elif address and config.process_id > 0:
        wait_for_coordinator(address, timeout, name)
    processes = f"the {config.num_processes} processes" if config.num_processes else "the processes"
    watchdog = threading.Timer(  # JAX's own wait for them ends in a C++ abort
        timeout,
        cli.fatal_now,
        (
            f"distributed: {processes} did not all join in {timeout:g} s (distributed."
            "initialization_timeout). Start every process with the same coordinator_address "
            "and num_processes, and its own process_id.",
            1,
        ),
    )
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=address or None,
            num_processes=config.num_processes or None,
            process_id=None if config.process_id < 0 else config.process_id,
            initialization_timeout=timeout + JAX_WAIT_MARGIN_S,
        )
    except ValueError as e:  # no cluster detected and the addresses not given
        raise ShardingError(
            f"distributed.enabled=True, but the processes cannot join ({str(e).rstrip('.')}). "
            "Outside SLURM, Open MPI, Kubernetes or Cloud TPU pass "
            "--config.distributed.coordinator_address, num_processes and process_id."
        ) from e
    except RuntimeError as e:  # JaxRuntimeError: e.g. the coordinator's port is taken
        raise ShardingError(
            f"distributed.enabled=True, but the processes cannot join: "
            f"{str(e).strip().splitlines()[0]} (coordinator {address!r})."
        ) from e
    finally:
        watchdog.cancel()


def coordinator_port(address: str) -> int | None:
    """The port of a coordinator address ``HOST:PORT``; None if ``address`` is not of that form
    or its port is not in 1-65535 (0 would listen on a port the others cannot know)."""
    match = re.fullmatch(r"[^\s]+:([0-9]+)", address)
    return int(match.group(1)) if match and 1 <= int(match.group(1)) <= 65535 else None


def check_port_free(address: str, name: str = "distributed.coordinator_address") -> None:
    """Raises ShardingError if this machine cannot listen on the port of ``address``
    (``HOST:PORT``, given by ``name``), where process 0's coordinator listens: JAX's service
    crashes the process (a segmentation fault) on a port in use."""
    port = coordinator_port(address)
    try:
        with socket.socket(socket.AF_INET6) as probe:  # as the service binds: [::]:PORT
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as it does
            probe.bind(("::", port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ShardingError(
                f"{name}={address!r}: port {port} is in use on this "
                "machine (by an earlier run still alive?), and process 0 must listen on it."
            ) from e


def wait_for_coordinator(
    address: str, timeout: float, name: str = "distributed.coordinator_address"
) -> None:
    """Waits until process 0's coordinator accepts connections at ``address`` (``HOST:PORT``,
    given by ``name``), or raises ShardingError after ``timeout`` seconds: JAX's own wait ends
    in a C++ abort."""
    host, _, port = address.rpartition(":")
    start = last_log = time.monotonic()
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
                return
        except socket.gaierror as e:
            raise ShardingError(f"{name}={address!r}: host {host!r} is unknown ({e}).") from e
        except OSError as e:
            now = time.monotonic()
            if now - start >= timeout:
                raise ShardingError(
                    f"{name}={address!r}: no coordinator answered in "
                    f"{timeout:g} s ({e.strerror or e}). Start process 0 (process_id=0) on that "
                    "host, or correct the address (distributed.initialization_timeout: the wait)."
                ) from e
            if now - last_log >= 30:
                logging.info("Waiting for the coordinator at %s (%.0f s).", address, now - start)
                last_log = now
            time.sleep(min(1.0, max(0.0, start + timeout - now)))


def start_backend() -> None:
    """Starts JAX's backend, or raises ShardingError saying why it cannot (e.g.
    ``$JAX_PLATFORMS`` names a platform this install lacks)."""
    try:
        jax.devices()
    except (AssertionError, RuntimeError) as e:
        platforms = os.environ.get("JAX_PLATFORMS")
        why = (  # JAX asserts, with no message, where a platform's plugin is missing
            str(e).strip().splitlines()[0]
            if str(e).strip()
            else "its plugin is not installed (for CUDA: pip install -e '.[cuda]')"
        )
        where = f" (JAX_PLATFORMS={platforms!r})" if platforms else ""
        raise ShardingError(f"JAX cannot start its backend{where}: {why}") from e


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all of every process) on one ``data`` axis.

    Devices are ordered process by process, so the rows of a global batch held by process ``p``
    are the contiguous ``p``-th slice, the one ``pipeline.train_batches`` gives that process.
    """
    devices = sorted(devices or jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the ``data`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "batch size") -> None:
    """Raises ShardingError unless the devices of ``mesh`` split ``batch_size`` evenly."""
    if batch_size % mesh.size:
        raise ShardingError(
            f"{name}={batch_size} does not divide by the {mesh.size} devices; "
            f"use a multiple of {mesh.size}."
        )


def padded_batch_size(batch_size: int, mesh: Mesh) -> int:
    """``batch_size`` rounded up to a multiple of the number of devices of ``mesh``."""
    return -(-batch_size // mesh.size) * mesh.size


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A copy of ``tree`` on every device of ``mesh``, e.g. a train state.

    It goes through the host so that arrays committed to one local device can be placed on
    other processes' devices too (every process must pass the same values).
    """
    return jax.device_put(jax.device_get(tree), replicated(mesh))


def shard_batch(batch: Any, mesh: Mesh, *, whole: bool = False) -> Any:
    """Host arrays -> global arrays split over the ``data`` axis.

    Args:
      batch: a pytree of arrays: this process's contiguous slice of the global batch, or with
        ``whole`` the global batch itself, the same on every process.
      mesh: the devices.
      whole: see ``batch``.
    """
    sharding = batch_sharded(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, x, x.shape if whole else None),
        batch,
    )
