#![doc = include_str!("../README.md")]

/// Contract revision implemented by this crate; bumped whenever fields are added to `tailbox.agent.v1`.
///
/// - 1: `Agent` (Hello, Run).
/// - 2: the `Sidecar` service (sidecar.proto), `HelloResponse.serve_mode`, `DaemonRestart.total`.
/// - 3: targets by name, `HttpTarget.expected_status_max`, `HttpEvidence.redirects` and
///   `final_url`, `NetmapEvidence.peer_ips` and `closest_peers`, `FAILURE_CLASS_DAEMON_UNRESPONSIVE`.
/// - 4: `Event.check_started` (`CheckStarted`), `Verdict.interrupted`.
/// - 5: fan-out (fleet.proto): `FleetEvent`, the `--json` line of a run of many sandboxes, and
///   `FleetReport`, its aggregated report. Written by the controller; agents send none.
pub const PROTO_VERSION: u32 = 5;

/// Layout version of the JSON report (`Report.schema_version`).
pub const REPORT_SCHEMA_VERSION: u32 = 1;

pub mod arch;
pub mod convert;
pub mod describe;
pub mod redact;
pub mod schema;

/// `tailbox.agent.v1`: the controller ↔ agent contract (`agent.proto`), the sidecar's service
/// (`sidecar.proto`) and the fan-out's JSON lines and report (`fleet.proto`).
pub mod agent {
    /// Generated types, client and server for `tailbox.agent.v1`, with serde (proto3 JSON) impls.
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        include!(concat!(env!("OUT_DIR"), "/tailbox.agent.v1.rs"));
        include!(concat!(env!("OUT_DIR"), "/tailbox.agent.v1.serde.rs"));
    }
}

/// The encoded `FileDescriptorSet` of `tailbox.agent.v1`, for reflection and compatibility checks.
pub const AGENT_V1_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tailbox_agent_v1_descriptor.bin"));

/// tailbox's own subset of Modal's wire contract (`modal_proto/*.proto`), with Modal's package
/// names and field numbers: clients for the controller, servers for the fake Modal in tests.
pub mod modal {
    /// `modal.client`: the control plane (`ModalClient`).
    pub mod client {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        include!(concat!(env!("OUT_DIR"), "/modal.client.rs"));
    }
    /// `modal.task_command_router`: exec and stdio on the sandbox's worker.
    pub mod task_command_router {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        include!(concat!(env!("OUT_DIR"), "/modal.task_command_router.rs"));
    }
}

/// The encoded `FileDescriptorSet` of our Modal subset, compared with Modal's published
/// descriptors by `tailbox_testkit::modal_descriptors`.
pub const MODAL_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/modal_descriptor.bin"));
