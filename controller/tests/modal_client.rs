//! tailbox's Modal client (library API) against the fake Modal, in-process: byte-exact stdio
//! through cuts and lost writes, and the fake's strictness (it refuses what Modal refuses).
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use bytes::Bytes;
use tailbox::testing::{
    CliError, ExecReader, ExecWriter, Fd, MapEnv, ModalClient, ProcessExit, Router, config, fs,
};
use tailbox_proto::modal::client::modal_client_client::ModalClientClient;
use tailbox_proto::modal::client::{AppGetOrCreateRequest, AuthTokenGetRequest};
use tailbox_proto::modal::task_command_router::task_command_router_client::TaskCommandRouterClient;
use tailbox_proto::modal::task_command_router::{
    TaskExecStartRequest, TaskExecStdinWriteRequest, TaskExecStdioReadRequest, TaskExecStdoutConfig,
};
use tailbox_testkit::fake_modal::{FakeModal, Faults, TOKEN_ID, TOKEN_SECRET};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

fn client(fake: &FakeModal) -> ModalClient {
    let env: Vec<(String, String)> = fake.env();
    let env = MapEnv(env.into_iter().collect());
    ModalClient::new(config::resolve(&env).unwrap().unwrap()).unwrap()
}

async fn sandbox(fake: &FakeModal) -> (ModalClient, String, Router) {
    let client = client(fake);
    let app_id = client.app_get_or_create("tailbox-tests").await.unwrap();
    let builder = client.image_builder_version().await.unwrap();
    let image_id = client
        .image_from_registry(&app_id, "example/image:1", &builder)
        .await
        .unwrap();
    let secret_id = client.ephemeral_secret(&HashMap::new()).await.unwrap();
    let id = client
        .sandbox_create(
            &app_id,
            &image_id,
            vec![secret_id],
            Duration::from_secs(300),
            &[("created-by".into(), "tailbox".into())],
        )
        .await
        .unwrap();
    let record = fake.record();
    let task_id = record.sandbox(&id).unwrap().task_id.clone();
    let router = Router::connect(client.clone(), task_id).await.unwrap();
    (client, id, router)
}

/// Puts a shell script into the sandbox (it runs with the host's /bin/sh).
async fn script(router: &Router, path: &str, body: &str) {
    let data = Bytes::from(format!("#!/bin/sh\n{body}\n"));
    fs::push_executable(router, path, data).await.unwrap();
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn output_arrives_byte_for_byte_through_repeated_cuts() {
    let fake = FakeModal::start().await.unwrap();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (_client, id, router) = sandbox(&fake).await;
        let expected = pattern(300_000);
        let data_path = fake.host_path(&id, "/data.bin").unwrap();
        std::fs::write(&data_path, &expected).unwrap();
        script(
            &router,
            "/bin/emit",
            &format!(
                "cat {} ; cat {} >&2",
                data_path.display(),
                data_path.display()
            ),
        )
        .await;

        fake.set_faults(Faults {
            cut_stdio_after: Some(10_000),
            ..Faults::default()
        });
        let exec_id = uuid::Uuid::new_v4().to_string();
        router
            .exec_start(&exec_id, vec!["/bin/emit".into()], HashMap::new())
            .await
            .unwrap();
        let mut stdout = ExecReader::new(router.clone(), exec_id.clone(), Fd::Stdout);
        let mut stderr = ExecReader::new(router.clone(), exec_id.clone(), Fd::Stderr);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (a, b) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        a.unwrap();
        b.unwrap();
        assert!(
            out == expected,
            "stdout differs ({} of {} bytes)",
            out.len(),
            expected.len()
        );
        assert!(
            err == expected,
            "stderr differs ({} of {} bytes)",
            err.len(),
            expected.len()
        );
        assert!(
            fake.record().stdio_cuts >= 50,
            "{} cuts",
            fake.record().stdio_cuts
        );
        assert_eq!(router.wait(&exec_id).await.unwrap(), ProcessExit::Code(0));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn stdin_is_ordered_and_exact_through_lost_writes() {
    let fake = FakeModal::start().await.unwrap();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (_client, _id, router) = sandbox(&fake).await;
        script(&router, "/bin/echo-stdin", "exec cat").await;
        fake.update_faults(|f| {
            f.unavailable.insert("TaskExecStdinWrite".into(), 5);
            f.cut_stdio_after = Some(64 * 1024);
        });
        let exec_id = uuid::Uuid::new_v4().to_string();
        router
            .exec_start(&exec_id, vec!["/bin/echo-stdin".into()], HashMap::new())
            .await
            .unwrap();
        let mut writer = ExecWriter::new(router.clone(), exec_id.clone());
        let mut reader = ExecReader::new(router.clone(), exec_id.clone(), Fd::Stdout);
        let expected = pattern(1_000_000);
        let sent = expected.clone();
        let write = tokio::spawn(async move {
            // Many small writes, as HTTP/2 framing makes them.
            for chunk in sent.chunks(3_000) {
                writer.write_all(chunk).await.unwrap();
            }
            writer.shutdown().await.unwrap();
        });
        let mut echoed = Vec::new();
        reader.read_to_end(&mut echoed).await.unwrap();
        write.await.unwrap();
        assert!(
            echoed == expected,
            "echo differs ({} of {} bytes)",
            echoed.len(),
            expected.len()
        );
        let record = fake.record();
        let exec = record.execs.iter().find(|e| e.exec_id == exec_id).unwrap();
        assert_eq!(exec.stdin_bytes, expected.len() as u64);
        // The faults really hit this exec: every injected loss happened, and the echo was cut.
        assert_eq!(fake.faults().unavailable["TaskExecStdinWrite"], 0);
        assert!(record.stdio_cuts >= 10, "{} cuts", record.stdio_cuts);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn push_skips_content_already_there_and_replaces_a_partial_file() {
    let fake = FakeModal::start().await.unwrap();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (_client, id, router) = sandbox(&fake).await;
        let data = Bytes::from(pattern(600_000));
        let first = fs::push_executable(&router, "/opt/bin/thing", data.clone())
            .await
            .unwrap();
        assert_eq!(first, 600_000);
        let host = fake.host_path(&id, "/opt/bin/thing").unwrap();
        assert_eq!(
            std::fs::metadata(&host).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let again = fs::push_executable(&router, "/opt/bin/thing", data.clone())
            .await
            .unwrap();
        assert_eq!(again, 0);
        // An interrupted earlier upload (wrong size) is written again.
        std::fs::write(&host, &data[..1000]).unwrap();
        let repaired = fs::push_executable(&router, "/opt/bin/thing", data.clone())
            .await
            .unwrap();
        assert_eq!(repaired, 600_000);
        assert!(std::fs::read(&host).unwrap() == data.as_ref());
    })
    .await
    .expect("test timed out");
}

/// `read_prefix` takes the head of a file and no more, a shorter file whole, and a missing one
/// is fs-tools' `NotFound`; `/proc/self/exe` is an ELF for the sandbox's architecture.
#[tokio::test(flavor = "multi_thread")]
async fn read_prefix_takes_the_head_of_a_file() {
    let fake = FakeModal::start().await.unwrap();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (_client, _id, router) = sandbox(&fake).await;
        let data = Bytes::from(pattern(600_000));
        fs::push_executable(&router, "/opt/bin/big", data.clone())
            .await
            .unwrap();
        let head = fs::read_prefix(&router, "/opt/bin/big", 20).await.unwrap();
        assert_eq!(head, data[..20]);
        let short = fs::read_prefix(&router, "/opt/bin/big", 700_000)
            .await
            .unwrap();
        assert!(short == data.as_ref());
        let err = fs::read_prefix(&router, "/opt/bin/missing", 20)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("/opt/bin/missing"), "{err}");
        let err = CliError::from(err).render();
        assert!(err.contains("NotFound"), "{err}");
        let exe = fs::read_prefix(&router, "/proc/self/exe", 20)
            .await
            .unwrap();
        assert_eq!(
            tailbox_proto::arch::Arch::from_elf_header(&exe).ok(),
            tailbox_proto::arch::Arch::host()
        );
    })
    .await
    .expect("test timed out");
}

/// A raw router request with `authorization: Bearer <jwt>`.
fn with_bearer<T>(message: T, jwt: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {jwt}").parse().unwrap());
    request
}

/// A raw request with the headers the real server requires (or some of them left out).
fn control_request<T>(
    message: T,
    token: Option<&str>,
    with_credentials: bool,
) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let md = request.metadata_mut();
    md.insert("x-modal-client-type", "9".parse().unwrap());
    md.insert("x-modal-client-version", "1.0.0".parse().unwrap());
    md.insert(
        "x-modal-libmodal-version",
        "modal-go/0.10.1".parse().unwrap(),
    );
    if with_credentials {
        md.insert("x-modal-token-id", TOKEN_ID.parse().unwrap());
        md.insert("x-modal-token-secret", TOKEN_SECRET.parse().unwrap());
    }
    if let Some(token) = token {
        md.insert("x-modal-auth-token", token.parse().unwrap());
    }
    request
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fake_refuses_what_modal_refuses() {
    let fake = FakeModal::start().await.unwrap();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let channel = tonic::transport::Endpoint::from_shared(fake.server_url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut control = ModalClientClient::new(channel);
        let app = || AppGetOrCreateRequest {
            app_name: "a".into(),
            environment_name: String::new(),
            object_creation_type: 1,
        };

        // No token id/secret.
        let err = control
            .auth_token_get(control_request(AuthTokenGetRequest {}, None, false))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        // A client identity no official SDK sends.
        let mut unknown = control_request(app(), None, true);
        unknown
            .metadata_mut()
            .insert("x-modal-libmodal-version", "tailbox/0.1.0".parse().unwrap());
        let err = control.app_get_or_create(unknown).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        // No auth token is fine (the Python SDK sends none on these calls)...
        control
            .app_get_or_create(control_request(app(), None, true))
            .await
            .unwrap();
        // ...but a made-up one is not.
        let err = control
            .app_get_or_create(control_request(app(), Some("a.b.c"), true))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);

        // The router: no bearer, arguments over 64 KiB, offsets beyond what exists.
        let (_client, _id, router) = sandbox(&fake).await;
        let task_id = router.task_id().to_owned();
        let channel = tonic::transport::Endpoint::from_shared(fake.router_url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut raw = TaskCommandRouterClient::new(channel);
        let start = |argv: Vec<String>| TaskExecStartRequest {
            task_id: task_id.clone(),
            exec_id: uuid::Uuid::new_v4().to_string(),
            command_args: argv,
            stdout_config: TaskExecStdoutConfig::Pipe as i32,
            stderr_config: 1,
            ..Default::default()
        };
        let err = raw
            .task_exec_start(start(vec!["/bin/true".into()]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);

        // With the JWT the fake granted for this task: one byte over 2^16 of arguments.
        let jwt = fake.router_jwt(&task_id).unwrap();
        let long = vec![
            "/bin/echo".into(),
            "x".repeat((1 << 16) - "/bin/echo".len() + 1),
        ];
        let err = raw
            .task_exec_start(with_bearer(start(long), &jwt))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

        script(&router, "/bin/hello", "echo hello").await;
        let exec_id = uuid::Uuid::new_v4().to_string();
        router
            .exec_start(&exec_id, vec!["/bin/hello".into()], HashMap::new())
            .await
            .unwrap();
        router.wait(&exec_id).await.unwrap();
        let read = TaskExecStdioReadRequest {
            task_id: task_id.clone(),
            exec_id: exec_id.clone(),
            offset: 7,
            file_descriptor: 0,
        };
        let err = raw
            .task_exec_stdio_read(with_bearer(read, &jwt))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange);
        // Its stdin was never closed, so a write past what arrived is a gap.
        let write = TaskExecStdinWriteRequest {
            task_id: task_id.clone(),
            exec_id: exec_id.clone(),
            offset: 10,
            data: b"x".to_vec(),
            eof: false,
        };
        let err = raw
            .task_exec_stdin_write(with_bearer(write, &jwt))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

        // Each of those, and nothing the real client sent, is recorded as a refusal.
        let refused: Vec<String> = fake
            .record()
            .refusals
            .into_iter()
            .map(|(rpc, _)| rpc)
            .collect();
        assert_eq!(
            refused,
            [
                "AuthTokenGet",
                "AppGetOrCreate",
                "AppGetOrCreate",
                "TaskExecStart",
                "TaskExecStart",
                "TaskExecStdioRead",
                "TaskExecStdinWrite"
            ],
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_call_keeps_its_idempotency_key_and_gives_up_after_three_retries() {
    let fake = FakeModal::start().await.unwrap();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let client = client(&fake);
        fake.update_faults(|f| {
            f.unavailable.insert("AppGetOrCreate".into(), 3);
        });
        client.app_get_or_create("retried").await.unwrap();
        let record = fake.record();
        let calls = record.calls_of("AppGetOrCreate");
        let keys: Vec<&str> = calls
            .iter()
            .map(|c| c.headers["x-idempotency-key"].as_str())
            .collect();
        assert_eq!(keys.len(), 4);
        assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
        let attempts: Vec<&str> = calls
            .iter()
            .map(|c| c.headers["x-retry-attempt"].as_str())
            .collect();
        assert_eq!(attempts, ["0", "1", "2", "3"]);

        // Four failures in a row: the error is an infrastructure error naming what failed.
        fake.update_faults(|f| {
            f.unavailable.insert("AppGetOrCreate".into(), 4);
        });
        let err = CliError::from(client.app_get_or_create("doomed").await.unwrap_err());
        assert_eq!(err.exit_status().code(), 3);
        assert!(
            err.render().contains("Failed to look up the Modal app"),
            "{}",
            err.render()
        );
        assert!(
            err.render().contains("hint: Modal did not answer"),
            "{}",
            err.render()
        );
        // A new logical call, a new key.
        let record = fake.record();
        let last = record.calls_of("AppGetOrCreate");
        assert_ne!(last[4].headers["x-idempotency-key"], keys[0]);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_auth_token_is_refreshed_at_half_its_lifetime() {
    let fake = FakeModal::start_with(tailbox_testkit::fake_modal::FakeConfig {
        // Wide margins: the first calls must come well inside the first half of the lifetime.
        auth_token_ttl: Duration::from_secs(12),
        ..Default::default()
    })
    .await
    .unwrap();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let client = client(&fake);
        client.app_get_or_create("a").await.unwrap();
        client.app_get_or_create("a").await.unwrap();
        assert_eq!(
            fake.record().auth_tokens,
            1,
            "a fresh token was fetched again"
        );
        tokio::time::sleep(Duration::from_millis(6500)).await;
        client.app_get_or_create("a").await.unwrap();
        assert_eq!(fake.record().auth_tokens, 2, "the token was not refreshed");
        // AuthTokenGet itself carries the credentials but no auth token.
        let record = fake.record();
        let get = record.calls_of("AuthTokenGet")[0];
        assert!(!get.headers.contains_key("x-modal-auth-token"));
        assert_eq!(get.headers["x-modal-token-id"], TOKEN_ID);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn waiting_for_an_exit_outlasts_any_run_of_transient_failures() {
    let fake = FakeModal::start().await.unwrap();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (_client, _id, router) = sandbox(&fake).await;
        script(&router, "/bin/exit-3", "exit 3").await;
        // More failures in a row than any other router call tolerates (10): waiting for an
        // exit is retried for as long as it takes, as the SDKs do.
        fake.update_faults(|f| {
            f.unavailable.insert("TaskExecWait".into(), 15);
        });
        let exec_id = uuid::Uuid::new_v4().to_string();
        router
            .exec_start(&exec_id, vec!["/bin/exit-3".into()], HashMap::new())
            .await
            .unwrap();
        assert_eq!(router.wait(&exec_id).await.unwrap(), ProcessExit::Code(3));
        assert!(fake.record().calls_of("TaskExecWait").len() >= 16);
    })
    .await
    .expect("test timed out");
}
