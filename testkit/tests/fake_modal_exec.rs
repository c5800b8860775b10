//! The exec semantics the fake models (its README gives the source of each): processes that
//! outlive their exec, stdout that ends only when every holder has closed it, exit codes and
//! signals, `timeout_secs`, stdout and stderr configurations, and what ending a sandbox does to
//! its execs. Driven with raw RPCs ([`FakeClient`]); Modal's own client checks the same through
//! the fake in `controller/tests/modal_official_client.rs`.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::Duration;

use tailbox_proto::arch::Arch;
use tailbox_proto::modal::client::generic_result::GenericStatus;
use tailbox_proto::modal::task_command_router::task_exec_wait_response::ExitStatus;
use tailbox_proto::modal::task_command_router::{
    TaskExecStartRequest, TaskExecStderrConfig, TaskExecStdinWriteRequest,
    TaskExecStdioFileDescriptor, TaskExecStdoutConfig,
};
use tailbox_testkit::fake_modal::{Exit, FakeClient, FakeConfig, FakeModal, piped};
use tailbox_testkit::process_is_alive;
use tonic::Code;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

async fn sandbox(fake: &FakeModal) -> FakeClient {
    fake.new_sandbox(&[], 300).await.unwrap()
}

/// Starts `script` under `sh -c` and reads the pid it prints on its first line.
async fn pid_printed_by(sandbox: &FakeClient, script: &str) -> i32 {
    let output = sandbox.exec(&["sh", "-c", script]).await.unwrap();
    assert_eq!(output.exit, ExitStatus::Code(0), "{output:?}");
    output.stdout_text().trim().parse().unwrap()
}

async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_background_process_outlives_its_exec_and_holds_stdout_open() {
    let fake = FakeModal::start().await.unwrap();
    bounded(async {
        let sandbox = sandbox(&fake).await;
        // Detached from the exec's stdio: it keeps running after the exec has ended.
        let pid = pid_printed_by(&sandbox, "sleep 600 </dev/null >/dev/null 2>&1 & echo $!").await;
        assert!(process_is_alive(pid));
        assert!(fake.sandbox_processes(sandbox.sandbox_id()).contains(&pid));

        // Still holding stdout: the exec's exit is its own, but stdout ends only with the child.
        let exec = sandbox
            .start(&["sh", "-c", "(sleep 3; echo late) & echo early"], piped())
            .await
            .unwrap();
        assert_eq!(sandbox.wait(&exec).await.unwrap(), ExitStatus::Code(0));
        let stdout = sandbox
            .read(&exec, TaskExecStdioFileDescriptor::Stdout)
            .await
            .unwrap();
        assert_eq!(stdout, b"early\nlate\n");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_codes_signals_and_poll() {
    let fake = FakeModal::start().await.unwrap();
    bounded(async {
        let sandbox = sandbox(&fake).await;
        let output = sandbox.exec(&["sh", "-c", "exit 42"]).await.unwrap();
        assert_eq!(output.exit, ExitStatus::Code(42));
        let output = sandbox.exec(&["sh", "-c", "kill -TERM $$"]).await.unwrap();
        assert_eq!(output.exit, ExitStatus::Signal(libc::SIGTERM));
        // A program the image does not have: the shell's "not found".
        let output = sandbox.exec(&["/no/such/program"]).await.unwrap();
        assert_eq!(output.exit, ExitStatus::Code(127));

        // Poll answers at once: nothing while it runs, then the same as wait.
        let exec = sandbox
            .start(&["sh", "-c", "read line; exit 5"], piped())
            .await
            .unwrap();
        assert_eq!(sandbox.poll(&exec).await.unwrap(), None);
        let stdin = TaskExecStdinWriteRequest {
            eof: true,
            data: b"go\n".to_vec(),
            ..Default::default()
        };
        sandbox.write_stdin(&exec, stdin).await.unwrap();
        assert_eq!(sandbox.wait(&exec).await.unwrap(), ExitStatus::Code(5));
        assert_eq!(
            sandbox.poll(&exec).await.unwrap(),
            Some(ExitStatus::Code(5))
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn timeout_secs_kills_the_exec_but_not_what_left_its_group() {
    let fake = FakeModal::start().await.unwrap();
    bounded(async {
        let sandbox = sandbox(&fake).await;
        let with_timeout = TaskExecStartRequest {
            timeout_secs: Some(1),
            ..piped()
        };
        let exec = sandbox
            .start(
                &[
                    "sh",
                    "-c",
                    "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!; sleep 600",
                ],
                with_timeout,
            )
            .await
            .unwrap();
        let output = sandbox.output(&exec).await.unwrap();
        assert_eq!(output.exit, ExitStatus::Signal(libc::SIGKILL));
        let detached: i32 = output.stdout_text().trim().parse().unwrap();
        assert!(
            process_is_alive(detached),
            "a process that left the exec's group was killed"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stdout_devnull_and_stderr_merged_into_stdout() {
    let fake = FakeModal::start().await.unwrap();
    bounded(async {
        let sandbox = sandbox(&fake).await;
        let devnull = TaskExecStartRequest {
            stdout_config: TaskExecStdoutConfig::Devnull as i32,
            ..piped()
        };
        let exec = sandbox
            .start(&["sh", "-c", "echo discarded; echo kept >&2"], devnull)
            .await
            .unwrap();
        let output = sandbox.output(&exec).await.unwrap();
        assert_eq!(
            (output.stdout.as_slice(), output.stderr.as_slice()),
            (&b""[..], &b"kept\n"[..])
        );

        let merged = TaskExecStartRequest {
            stderr_config: TaskExecStderrConfig::Stdout as i32,
            ..piped()
        };
        let exec = sandbox
            .start(&["sh", "-c", "echo one; echo two >&2; echo three"], merged)
            .await
            .unwrap();
        let output = sandbox.output(&exec).await.unwrap();
        assert_eq!(output.stdout_text(), "one\ntwo\nthree\n");
        assert!(output.stderr.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ending_a_sandbox_kills_every_process_in_it_and_its_execs_are_gone() {
    let fake = FakeModal::start().await.unwrap();
    bounded(async {
        let sandbox = sandbox(&fake).await;
        // Detached every way a process can be: its own session, reparented away from the exec.
        let detached = pid_printed_by(
            &sandbox,
            "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!",
        )
        .await;
        let running = sandbox.start(&["sleep", "600"], piped()).await.unwrap();
        sandbox.terminate().await.unwrap();

        // The running exec was killed, and the detached process is gone too.
        let record = fake
            .wait_for(TEST_TIMEOUT, |r| {
                r.execs
                    .iter()
                    .any(|e| e.exec_id == running && e.exit.is_some())
            })
            .await
            .unwrap();
        let exec = record.execs.iter().find(|e| e.exec_id == running).unwrap();
        assert_eq!(exec.exit, Some(Exit::Signal(libc::SIGKILL)));
        assert!(
            !process_is_alive(detached),
            "a detached process outlived its sandbox"
        );
        assert!(fake.sandbox_processes(sandbox.sandbox_id()).is_empty());
        // The task is gone: nothing more can be asked of it.
        let err = sandbox.exec(&["true"]).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        let err = sandbox.wait(&running).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_ends_with_its_entrypoint_and_takes_its_processes_along() {
    let fake = FakeModal::start().await.unwrap();
    bounded(async {
        // The entrypoint waits for a file the exec below creates, then exits 3.
        let sandbox = fake
            .new_sandbox(
                &[
                    "sh",
                    "-c",
                    "while [ ! -e /tmp/go ]; do sleep 0.1; done; exit 3",
                ],
                300,
            )
            .await
            .unwrap();
        let background =
            pid_printed_by(&sandbox, "sleep 600 </dev/null >/dev/null 2>&1 & echo $!").await;
        // Its exec may not outlive the sandbox long enough to answer; only its start matters.
        sandbox.start(&["touch", "/tmp/go"], piped()).await.unwrap();
        let ended = sandbox.sandbox_result(30.0).await.unwrap().unwrap();
        assert_eq!(
            (ended.status(), ended.exitcode),
            (GenericStatus::Failure, 3),
            "{ended:?}"
        );
        assert!(
            !process_is_alive(background),
            "a process outlived its sandbox's entrypoint"
        );
        assert!(fake.sandbox_processes(sandbox.sandbox_id()).is_empty());
    })
    .await;
}

/// A sandbox of another architecture than this machine's: fs-tools' own executable
/// (`/proc/self/exe`, which tailbox reads to learn the CPU) is an ELF for it, and an executable
/// for this machine fails as a kernel fails it, so an agent of the wrong architecture cannot
/// pass unnoticed.
#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_of_another_architecture_says_so_and_refuses_this_machines_executables() {
    let host = Arch::host().unwrap();
    let other = Arch::ALL.into_iter().find(|&a| a != host).unwrap();
    let fake = FakeModal::start_with(FakeConfig {
        arch: other,
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    bounded(async {
        let sandbox = sandbox(&fake).await;
        let output = sandbox
            .exec(&[
                "/__modal/.bin/modal-sandbox-fs-tools",
                r#"{"ReadFile":{"path":"/proc/self/exe"}}"#,
            ])
            .await
            .unwrap();
        assert_eq!(output.exit, ExitStatus::Code(0), "{output:?}");
        assert_eq!(Arch::from_elf_header(&output.stdout), Ok(other));

        let native = fake
            .host_path(sandbox.sandbox_id(), "/opt/bin/true")
            .unwrap();
        std::fs::create_dir_all(native.parent().unwrap()).unwrap();
        std::fs::copy("/bin/true", &native).unwrap();
        let output = sandbox.exec(&["/opt/bin/true"]).await.unwrap();
        assert_eq!(output.exit, ExitStatus::Code(126), "{output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("Exec format error"), "{stderr}");
        assert!(
            stderr.contains(&format!("an {host} executable in an {other} sandbox")),
            "{stderr}"
        );
    })
    .await;
}
