//! The real agent service and the real controller session over an in-memory duplex stream: the
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.
//! whole contract with no processes and no pipes.

use std::time::Duration;

use futures::FutureExt as _;
use tailbox::testing::{AgentProcess, CliError, OutputMode, ProcessExit, Renderer, run_session};
use tailbox_agent::run::RunContext;
use tailbox_agent::service::AgentService;
use tailbox_proto::agent::v1::{CheckStatus, PingTarget, RunRequest};

#[tokio::test]
async fn handshake_and_run_over_memory() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (controller_side, agent_side) = tokio::io::duplex(64 * 1024);
        let context = RunContext {
            agent_sha256: "ab".repeat(32),
            ..Default::default()
        };
        let server = tokio::spawn(tailbox_agent::server::serve_connection(
            agent_side,
            AgentService::new(context),
        ));
        let (exit_tx, exit_rx) = tokio::sync::oneshot::channel::<ProcessExit>();
        let agent = AgentProcess {
            io: Box::new(controller_side),
            stderr: Box::pin(tokio::io::empty()),
            exit: exit_rx.map(|r| r.unwrap_or(ProcessExit::Code(0))).boxed(),
            expected_sha256: Some("ab".repeat(32)),
        };
        let request = RunRequest {
            run_id: "run-1".into(),
            sandbox_id: "memory".into(),
            ping_targets: vec![PingTarget {
                address: "100.64.0.7".into(),
            }],
            ..Default::default()
        };
        let mut renderer = Renderer::new(OutputMode::Human {
            verbose: false,
            quiet: true,
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let session =
            tokio::spawn(async move { run_session(agent, request, &mut renderer, deadline).await });
        // The server ends when the session closes its side of the stream.
        server.await.unwrap().unwrap();
        let _ = exit_tx.send(ProcessExit::Code(0));
        let outcome = session.await.unwrap().unwrap();

        assert_eq!(outcome.hello.agent_sha256, "ab".repeat(32));
        assert_eq!(outcome.hello.proto_version, tailbox_proto::PROTO_VERSION);
        let report = outcome.report;
        assert_eq!(report.run_id, "run-1");
        assert_eq!(report.schema_version, tailbox_proto::REPORT_SCHEMA_VERSION);
        let names: Vec<_> = report.checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["preflight", "ping"]);
        assert_eq!(report.checks[1].status, CheckStatus::Skip as i32);
        assert_eq!(report.checks[1].target, "100.64.0.7");
        assert!(report.verdict.unwrap().ok);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_sha_mismatch_is_refused() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (controller_side, agent_side) = tokio::io::duplex(64 * 1024);
        let context = RunContext {
            agent_sha256: "cd".repeat(32),
            ..Default::default()
        };
        tokio::spawn(tailbox_agent::server::serve_connection(
            agent_side,
            AgentService::new(context),
        ));
        let agent = AgentProcess {
            io: Box::new(controller_side),
            stderr: Box::pin(tokio::io::empty()),
            exit: futures::future::pending().boxed(),
            expected_sha256: Some("ab".repeat(32)),
        };
        let mut renderer = Renderer::new(OutputMode::Human {
            verbose: false,
            quiet: true,
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let err = CliError::from(
            run_session(agent, RunRequest::default(), &mut renderer, deadline)
                .await
                .unwrap_err(),
        );
        assert_eq!(err.exit_status().code(), 3);
        assert!(err.render().contains("not the binary"), "{}", err.render());
    })
    .await
    .expect("test timed out");
}
