"""The sidecar's data path: sealed inputs in, plaintext to the workload over a private Unix
socket, workload outputs sealed to their recipients.

``sidecar run`` builds a :class:`KeyRing` from the keys the broker released, the input specs,
an output sink and the recipients, and runs a :class:`WorkloadServer` while the workload runs::

    tree = ProcessTree()
    with KeyRing(valid_until=expiry, reattest=renew) as keys, WorkloadServer(
        socket_dir=run_dir / "socket",
        inputs=specs,
        keyring=keys,
        outputs=LocalDirectoryOutput(out_dir),
        recipients=[("advertiser", adv_key), ("publisher", pub_key)],
        allowed_peer=tree,
    ) as server:
        proc = subprocess.Popen(cmd, env={**os.environ, **server.environment()})
        tree.set_root(proc.pid)
        proc.wait()
"""

# First: it decides how gRPC is initialised.
from sidecar.dataplane import _grpcinit  # noqa: F401
from sidecar.dataplane.config import DataPlaneConfig, load_dataplane_config
from sidecar.dataplane.errors import (
    AttestationExpiredError,
    DataPlaneError,
    InputAuthenticationError,
    InputSourceError,
    KeyRingError,
    OutputExistsError,
    OutputNameError,
    OutputStoreError,
    ReattestationError,
    SocketSetupError,
    UnknownDataKeyError,
    UnknownInputError,
    WorkloadInputError,
    WorkloadOutputError,
)
from sidecar.dataplane.inputs import (
    InputSource,
    InputSourceFactory,
    InputSpec,
    LocalFileInput,
    input_source_for,
    register_input_scheme,
)
from sidecar.dataplane.keyring import KeyRing, ReattestCallback
from sidecar.dataplane.outputs import (
    LocalDirectoryOutput,
    OutputReceipt,
    OutputSink,
    OutputWriter,
    Recipient,
    check_output_name,
)
from sidecar.dataplane.peers import AllowedPeer, PeerCredentials, ProcessTree
from sidecar.dataplane.server import SOCKET_ENV, WorkloadServer

__all__ = [
    "SOCKET_ENV",
    "AllowedPeer",
    "AttestationExpiredError",
    "DataPlaneConfig",
    "DataPlaneError",
    "InputAuthenticationError",
    "InputSource",
    "InputSourceError",
    "InputSourceFactory",
    "InputSpec",
    "KeyRing",
    "KeyRingError",
    "LocalDirectoryOutput",
    "LocalFileInput",
    "OutputExistsError",
    "OutputNameError",
    "OutputReceipt",
    "OutputSink",
    "OutputStoreError",
    "OutputWriter",
    "PeerCredentials",
    "ProcessTree",
    "ReattestCallback",
    "ReattestationError",
    "Recipient",
    "SocketSetupError",
    "UnknownDataKeyError",
    "UnknownInputError",
    "WorkloadInputError",
    "WorkloadOutputError",
    "WorkloadServer",
    "check_output_name",
    "input_source_for",
    "load_dataplane_config",
    "register_input_scheme",
]
