//! The real `tailbox` binary against the fake Modal (testkit `FakeModal`): sandbox lifecycle,
//! the upload of the real static agent, gRPC over the exec's stdio, cleanup, and the faults a
//! real network brings.
#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
use tailbox_proto::arch::Arch;
use tailbox_testkit::agent::{agent_binary, static_agent_binary};
use tailbox_testkit::fake_modal::{FakeConfig, FakeModal, Faults, Record, TOKEN_SECRET};
use tokio::io::{AsyncBufReadExt as _, BufReader};

/// Bound for one whole test, once the static agent is built.
const TEST_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs a test within [`TEST_TIMEOUT`]. The static agent is built first, outside the bound: on
/// a cold cache that takes minutes, and the test that happens to build it is not slow itself.
async fn bounded(test: impl Future<Output = ()>) {
    tokio::task::spawn_blocking(static_agent_binary)
        .await
        .unwrap();
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test timed out");
}

/// Output of one `tailbox` run.
struct Run {
    stdout: String,
    stderr: String,
    code: Option<i32>,
}

impl From<std::process::Output> for Run {
    fn from(output: std::process::Output) -> Self {
        Self {
            stdout: String::from_utf8(output.stdout).unwrap(),
            stderr: String::from_utf8(output.stderr).unwrap(),
            code: output.status.code(),
        }
    }
}

impl Run {
    fn events(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    fn report(&self) -> Value {
        tailbox_testkit::report_of(&self.events(), &self.stderr).clone()
    }

    fn assert_code(&self, code: i32) {
        assert_eq!(
            self.code,
            Some(code),
            "stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
    }
}

/// `tailbox` with a clean environment: only PATH, `home` as HOME, and NO_COLOR.
fn tailbox(home: &Path, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tailbox_testkit::tailbox_command(env!("CARGO_BIN_EXE_tailbox"), home);
    cmd.args(args).env("NO_COLOR", "1");
    cmd
}

/// [`tailbox`] with the fake's credentials and URL (and a HOME without ~/.modal.toml), and
/// `extra`.
fn command(
    fake: &FakeModal,
    home: &Path,
    args: &[&str],
    extra: &[(&str, &str)],
) -> tokio::process::Command {
    let mut cmd = tailbox(home, args);
    cmd.envs(fake.env()).envs(extra.iter().copied());
    cmd
}

async fn run(fake: &FakeModal, args: &[&str], extra: &[(&str, &str)]) -> Run {
    let home = tempfile::tempdir().unwrap();
    let output = command(fake, home.path(), args, extra)
        .output()
        .await
        .unwrap();
    Run::from(output)
}

fn static_agent() -> String {
    static_agent_binary().display().to_string()
}

fn sha256_of(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// `check --sandbox modal --json --agent <static agent>` plus `extra_args`.
async fn check(fake: &FakeModal, extra_args: &[&str]) -> Run {
    let agent = static_agent();
    let mut args = vec![
        "check",
        "--sandbox",
        "modal",
        "--json",
        "--agent",
        agent.as_str(),
    ];
    args.extend_from_slice(extra_args);
    run(fake, &args, &[]).await
}

/// Agent events are numbered densely from 1 (controller events carry seq 0): nothing lost,
/// nothing twice.
fn assert_agent_seqs_dense(run: &Run) {
    let seqs: Vec<u64> = run
        .events()
        .iter()
        .map(|e| e["seq"].as_str().unwrap().parse::<u64>().unwrap())
        .filter(|&s| s != 0)
        .collect();
    assert!(!seqs.is_empty(), "no agent events; stderr:\n{}", run.stderr);
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "stderr:\n{}",
        run.stderr
    );
}

fn only_sandbox(record: &Record) -> &tailbox_testkit::fake_modal::SandboxRecord {
    assert_eq!(record.sandboxes.len(), 1, "{:#?}", record.sandboxes);
    &record.sandboxes[0]
}

#[tokio::test(flavor = "multi_thread")]
async fn check_uploads_the_static_agent_runs_it_and_terminates_the_sandbox() {
    let fake = FakeModal::start().await.unwrap();
    let agent = static_agent_binary();
    bounded(async {
        let run = check(&fake, &[]).await;
        run.assert_code(0);
        let report = run.report();
        assert_eq!(report["verdict"]["ok"], true);
        assert_eq!(report["sandbox"]["backend"], "modal");
        assert_eq!(
            report["sandbox"]["image"],
            "ghcr.io/justinmoon/cook-sandbox:latest"
        );
        assert_eq!(report["sandbox"]["kept"], false);
        let size = std::fs::metadata(&agent).unwrap().len();
        assert_eq!(
            report["sandbox"]["uploaded_bytes"].as_str().unwrap(),
            size.to_string()
        );
        // The agent that answered is the binary we built (its own /proc/self/exe hash).
        let sha = sha256_of(&agent);
        assert_eq!(report["agent"]["sha256"], sha);
        assert!(
            report["checks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == "preflight")
        );
        assert_agent_seqs_dense(&run);

        let record = fake.record();
        let sandbox = only_sandbox(&record);
        assert_eq!(report["sandbox"]["sandbox_id"], sandbox.id);
        assert!(
            sandbox.terminated_at.is_some(),
            "the sandbox was not terminated"
        );
        assert!(
            sandbox
                .tags
                .contains(&("created-by".into(), "tailbox".into()))
        );
        assert!(sandbox.tags.iter().any(|(k, _)| k == "tailbox-run"));
        assert_eq!(sandbox.env.get("HOME").map(String::as_str), Some("/root"));
        let path = format!("/tmp/tailbox/bin/tailbox-agent-{sha}");
        assert_eq!(record.files_written, vec![path.clone()]);
        assert_eq!(record.bytes_written, size);
        let agent_execs = record.agent_execs();
        assert_eq!(agent_execs.len(), 1);
        assert_eq!(
            agent_execs[0].argv[..3],
            [path.as_str(), "serve", "--stdio"]
        );
        assert!(
            agent_execs[0].stdout_piped,
            "the agent's stdout must be PIPE"
        );
        // The client never had a call refused, and identified itself like the Go SDK.
        assert!(record.refusals.is_empty(), "{:?}", record.refusals);
        let create = record.calls_of("SandboxCreate")[0];
        assert_eq!(create.headers["x-modal-client-type"], "9");
        assert_eq!(create.headers["x-modal-client-version"], "1.0.0");
        assert_eq!(
            create.headers["x-modal-libmodal-version"],
            "modal-go/0.10.1"
        );
        assert!(create.headers["user-agent"].starts_with("tailbox/"));
        // Like the Go SDK, every control-plane call but AuthTokenGet carries the token (the
        // fake does not insist: Python sends none on these).
        for call in record.calls.iter().filter(|c| c.service == "control") {
            assert_eq!(
                call.headers.contains_key("x-modal-auth-token"),
                call.rpc != "AuthTokenGet",
                "{}",
                call.rpc
            );
        }
        assert_eq!(record.auth_tokens, 1);
        // The token secret is never printed.
        assert!(!run.stdout.contains(TOKEN_SECRET) && !run.stderr.contains(TOKEN_SECRET));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_pick_modal_and_say_so() {
    let fake = FakeModal::start().await.unwrap();
    bounded(async {
        let agent = static_agent();
        let run = run(&fake, &["check", "--agent", &agent], &[]).await;
        run.assert_code(0);
        assert!(
            run.stderr
                .contains("sandbox: modal (Modal credentials are configured)"),
            "{}",
            run.stderr
        );
        assert!(run.stderr.contains("terminated"), "{}", run.stderr);
        assert!(run.stdout.starts_with("CHECK"), "{}", run.stdout);
        assert!(fake.record().sandboxes[0].terminated_at.is_some());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_from_the_modal_config_file_are_used() {
    let fake = FakeModal::start().await.unwrap();
    bounded(async {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(
            home.path().join(".modal.toml"),
            format!(
                "[other]\ntoken_id = \"ak-other\"\ntoken_secret = \"as-other\"\n\n[fake]\ntoken_id = \"{}\"\ntoken_secret = \"{TOKEN_SECRET}\"\nserver_url = \"{}\"\nactive = true\n",
                tailbox_testkit::fake_modal::TOKEN_ID,
                fake.server_url()
            ),
        )
        .unwrap();
        let agent = static_agent();
        // No MODAL_* variables: everything comes from the file.
        let output = tailbox(home.path(), &["check", "--json", "--agent", &agent])
            .output()
            .await
            .unwrap();
        let run = Run::from(output);
        run.assert_code(0);
        assert_eq!(run.report()["sandbox"]["backend"], "modal");
        assert!(fake.record().sandboxes[0].terminated_at.is_some());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kept_sandbox_is_reused_without_uploading_and_swept_at_the_end() {
    let fake = FakeModal::start().await.unwrap();
    bounded(async {
        let first = check(&fake, &["--keep"]).await;
        first.assert_code(0);
        let id = first.report()["sandbox"]["sandbox_id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(first.report()["sandbox"]["kept"], true);
        assert!(
            first
                .stderr
                .contains(&format!("tailbox check --sandbox-id {id}"))
                && first
                    .stderr
                    .contains(&format!("tailbox sandbox terminate {id}")),
            "{}",
            first.stderr
        );
        let written = fake.record().bytes_written;
        assert!(written > 0);
        assert!(fake.record().sandbox(&id).unwrap().terminated_at.is_none());

        let second = check(&fake, &["--sandbox-id", &id]).await;
        second.assert_code(0);
        let report = second.report();
        assert_eq!(report["sandbox"]["sandbox_id"], id);
        assert_eq!(report["sandbox"]["uploaded_bytes"], "0");
        let record = fake.record();
        assert_eq!(
            record.bytes_written, written,
            "the second run uploaded bytes"
        );
        assert_eq!(
            record.sandboxes.len(),
            1,
            "the second run created a sandbox"
        );
        // Two runs of the agent; before the second, one `attach` looked for a sidecar in the
        // existing sandbox (there was none, so the second run started its own agent).
        let serves = |argv: &[String]| argv.iter().any(|a| a == "serve");
        let attaches = |argv: &[String]| argv.iter().any(|a| a == "attach");
        assert_eq!(
            record
                .agent_execs()
                .iter()
                .filter(|e| serves(&e.argv))
                .count(),
            2
        );
        assert_eq!(
            record
                .agent_execs()
                .iter()
                .filter(|e| attaches(&e.argv))
                .count(),
            1
        );
        // Attached, not created: it stays running.
        assert!(record.sandbox(&id).unwrap().terminated_at.is_none());

        // One more leftover that is not ours: sweep must leave it alone.
        let foreign = fake
            .create_sandbox_directly(&[("created-by", "someone-else")])
            .await
            .unwrap();
        let sweep = run(&fake, &["sandbox", "sweep", "--dry-run"], &[]).await;
        sweep.assert_code(0);
        assert_eq!(sweep.stdout.trim(), id);
        assert!(fake.record().sandbox(&id).unwrap().terminated_at.is_none());
        let sweep = run(&fake, &["sandbox", "sweep"], &[]).await;
        sweep.assert_code(0);
        assert_eq!(sweep.stdout.trim(), id);
        let record = fake.record();
        assert!(record.sandbox(&id).unwrap().terminated_at.is_some());
        assert!(record.sandbox(&foreign).unwrap().terminated_at.is_none());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sweep_pages_through_many_sandboxes() {
    let fake = FakeModal::start_with(FakeConfig {
        list_page_size: 2,
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    bounded(async {
        // Five kept sandboxes in the app, listed two per page.
        for _ in 0..5 {
            check(&fake, &["--keep"]).await.assert_code(0);
        }
        let sweep = run(&fake, &["sandbox", "sweep"], &[]).await;
        sweep.assert_code(0);
        assert_eq!(sweep.stdout.lines().count(), 5, "{}", sweep.stdout);
        let record = fake.record();
        assert!(record.sandboxes.iter().all(|s| s.terminated_at.is_some()));
        assert!(
            record.calls_of("SandboxList").len() >= 3,
            "paging used one page"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_event_arrives_exactly_once_when_stdout_is_cut_again_and_again() {
    let fake = FakeModal::start().await.unwrap();
    fake.set_faults(Faults {
        cut_stdio_after: Some(64),
        ..Faults::default()
    });
    bounded(async {
        let run = check(&fake, &[]).await;
        run.assert_code(0);
        assert_agent_seqs_dense(&run);
        assert_eq!(run.report()["verdict"]["ok"], true);
        let record = fake.record();
        assert!(record.stdio_cuts >= 10, "only {} cuts", record.stdio_cuts);
        assert!(record.sandboxes[0].terminated_at.is_some());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn seeded_random_stdout_cuts_lose_and_repeat_no_event() {
    let seed = tailbox_testkit::fault_seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let fake = FakeModal::start().await.unwrap();
    bounded(async {
        // A clean run says how long the agent's stdout is.
        let clean = check(&fake, &[]).await;
        clean.assert_code(0);
        let serve = |record: &Record| -> u64 {
            record
                .agent_execs()
                .iter()
                .rev()
                .find(|e| e.argv.iter().any(|a| a == "serve"))
                .map(|e| e.stdout_bytes)
                .unwrap()
        };
        let length = usize::try_from(serve(&fake.record())).unwrap();
        assert!(length > 1000, "the agent wrote only {length} bytes");

        // Four runs, each cut at 25 random offsets of its stdout: 100 cuts in all.
        let mut cuts = 0;
        for run_no in 0..4 {
            let mut offsets: Vec<usize> = (0..25).map(|_| rng.usize(1..length * 9 / 10)).collect();
            offsets.sort_unstable();
            offsets.dedup();
            let before = fake.record().stdio_cuts;
            fake.update_faults(|f| f.cut_stdout_at.clone_from(&offsets));
            let run = check(&fake, &[]).await;
            assert_eq!(
                run.code,
                Some(0),
                "seed {seed}, run {run_no}, cuts at {offsets:?}; stderr:\n{}",
                run.stderr
            );
            assert_agent_seqs_dense(&run);
            cuts += fake.record().stdio_cuts - before;
        }
        assert!(cuts >= 95, "seed {seed}: only {cuts} cuts fired");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_keep_one_idempotency_key_and_count_attempts() {
    let fake = FakeModal::start().await.unwrap();
    fake.update_faults(|f| {
        f.unavailable.insert("SandboxCreate".into(), 2);
        // These hit the first stdin close of the upload's fs-tools execs.
        f.unavailable.insert("TaskExecStdinWrite".into(), 3);
    });
    bounded(async {
        let (run, ()) = tokio::join!(check(&fake, &[]), async {
            // Now lose some of the agent's: every stdin write after it starts carries its gRPC.
            fake.wait_for(Duration::from_secs(120), |r| {
                !r.agent_execs().is_empty() || r.sandboxes.iter().any(|s| s.terminated_at.is_some())
            })
            .await
            .unwrap();
            fake.update_faults(|f| {
                f.unavailable.insert("TaskExecStdinWrite".into(), 3);
            });
        });
        run.assert_code(0);
        assert_eq!(
            fake.faults().unavailable["TaskExecStdinWrite"],
            0,
            "the agent's stdin lost no writes"
        );
        let record = fake.record();
        let creates = record.calls_of("SandboxCreate");
        assert_eq!(creates.len(), 3);
        let keys: Vec<&str> = creates
            .iter()
            .map(|c| c.headers["x-idempotency-key"].as_str())
            .collect();
        assert!(
            keys.iter().all(|k| *k == keys[0]) && keys[0].len() == 36,
            "{keys:?}"
        );
        let attempts: Vec<&str> = creates
            .iter()
            .map(|c| c.headers["x-retry-attempt"].as_str())
            .collect();
        assert_eq!(attempts, ["0", "1", "2"]);
        assert!(!creates[0].headers.contains_key("x-retry-delay"));
        assert!(creates[2].headers["x-retry-delay"].parse::<f64>().unwrap() > 0.0);
        // Another logical call has another key.
        let other = record.calls_of("AppGetOrCreate")[0];
        assert_ne!(other.headers["x-idempotency-key"], keys[0]);
        // One sandbox despite the retries, and the agent's stdin survived lost writes.
        assert_eq!(record.sandboxes.len(), 1);
        assert_agent_seqs_dense(&run);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_upload_resumes_and_an_expired_router_jwt_is_refreshed() {
    let fake = FakeModal::start().await.unwrap();
    let agent = static_agent_binary();
    fake.update_faults(|f| {
        f.cut_stdin_stream_after = Some(700 * 1024);
        f.router_jwt_ttl = Some(Duration::from_secs(2));
        // The agent starts after the first JWT has expired.
        f.latency
            .insert("TaskExecStart".into(), Duration::from_millis(2500));
        f.unscheduled_polls = 2;
    });
    bounded(async {
        let run = check(&fake, &[]).await;
        run.assert_code(0);
        assert_agent_seqs_dense(&run);
        let record = fake.record();
        assert!(
            !record.calls_of("TaskExecStdinStatus").is_empty(),
            "the upload never resumed"
        );
        assert!(
            record.router_grants >= 2,
            "the router JWT was never refreshed"
        );
        assert!(
            record
                .refusals
                .iter()
                .any(|(_, why)| why.contains("expired"))
        );
        assert_eq!(record.calls_of("SandboxGetTaskId").len(), 3);
        // The file in the sandbox is the agent, byte for byte.
        let id = &record.sandboxes[0].id;
        let sha = sha256_of(&agent);
        let host = fake
            .host_path(id, &format!("/tmp/tailbox/bin/tailbox-agent-{sha}"))
            .unwrap();
        assert_eq!(sha256_of(&host), sha);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tailscale_tarball_is_unpacked_here_and_pushed() {
    let fake = FakeModal::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (tarball, tailscaled_body, cli_body) = fake_tailscale_tarball(dir.path(), host_arch());
    bounded(async {
        let run = check(&fake, &["--tailscale-tarball", tarball.to_str().unwrap()]).await;
        run.assert_code(0);
        let record = fake.record();
        let sha = |b: &[u8]| hex::encode(Sha256::digest(b));
        let tailscaled = format!("/tmp/tailbox/bin/tailscaled-{}", sha(&tailscaled_body));
        let cli = format!("/tmp/tailbox/bin/tailscale-{}", sha(&cli_body));
        assert!(
            record.files_written.contains(&tailscaled),
            "{:?}",
            record.files_written
        );
        assert!(
            record.files_written.contains(&cli),
            "{:?}",
            record.files_written
        );
        let host = fake
            .host_path(&record.sandboxes[0].id, &tailscaled)
            .unwrap();
        assert_eq!(std::fs::read(&host).unwrap(), tailscaled_body);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&host).unwrap().permissions(),
        );
        assert_eq!(
            mode & 0o111,
            0o111,
            "tailscaled is not executable: {mode:o}"
        );
        let size = std::fs::metadata(static_agent_binary()).unwrap().len()
            + tailscaled_body.len() as u64
            + cli_body.len() as u64;
        assert_eq!(
            run.report()["sandbox"]["uploaded_bytes"].as_str().unwrap(),
            size.to_string()
        );
    })
    .await;
}

/// A tailscale release tarball for `arch` whose binaries are ELF headers for it plus a marker;
/// its path and the two bodies.
fn fake_tailscale_tarball(dir: &Path, arch: Arch) -> (PathBuf, Vec<u8>, Vec<u8>) {
    let stem = format!("tailscale_1.0.0_{}", arch.go_arch());
    let tarball = dir.join(format!("{stem}.tgz"));
    let tailscaled = [arch.elf_header().as_slice(), b"fake tailscaled\n"].concat();
    let cli = [arch.elf_header().as_slice(), b"fake tailscale cli\n"].concat();
    let file = std::fs::File::create(&tarball).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (name, body) in [
        ("tailscaled", tailscaled.as_slice()),
        ("tailscale", cli.as_slice()),
        ("systemd/tailscaled.service", b"[Unit]\n".as_slice()),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o755);
        header.set_cksum();
        tar.append_data(&mut header, format!("{stem}/{name}"), body)
            .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
    (tarball, tailscaled, cli)
}

fn host_arch() -> Arch {
    Arch::host().unwrap()
}

fn other_arch() -> Arch {
    Arch::ALL.into_iter().find(|&a| a != host_arch()).unwrap()
}

/// The sandbox's architecture was asked of fs-tools' own binary, with no tool in the image.
fn asked_the_sandbox_its_architecture(record: &Record) -> bool {
    record.execs.iter().any(|e| {
        e.argv.len() == 2
            && e.argv[0] == "/__modal/.bin/modal-sandbox-fs-tools"
            && e.argv[1] == r#"{"ReadFile":{"path":"/proc/self/exe"}}"#
    })
}

/// A usage error (exit 2) with `error` and `hint`, after the sandbox was asked its architecture
/// and before anything was pushed (neither tailscale nor the agent), the sandbox terminated.
fn assert_refused_after_asking_the_arch(run: &Run, fake: &FakeModal, error: &str, hint: &str) {
    run.assert_code(2);
    assert!(run.stderr.contains(error), "{}", run.stderr);
    assert!(run.stderr.contains(hint), "{}", run.stderr);
    let record = fake.record();
    assert!(asked_the_sandbox_its_architecture(&record));
    assert!(
        record.files_written.is_empty(),
        "{:?}",
        record.files_written
    );
    assert_eq!(record.bytes_written, 0);
    assert!(record.agent_execs().is_empty());
    assert!(only_sandbox(&record).terminated_at.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tailscale_tarball_for_another_architecture_is_refused_before_it_is_pushed() {
    let fake = FakeModal::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (tarball, _, _) = fake_tailscale_tarball(dir.path(), other_arch());
    bounded(async {
        let run = check(&fake, &["--tailscale-tarball", tarball.to_str().unwrap()]).await;
        let expected = format!(
            "error: The tailscale tarball {} holds {} binaries, but the sandbox is {}",
            tarball.display(),
            other_arch(),
            host_arch()
        );
        let hint = format!(
            "hint: The sandbox is {0}: pass the {0} tarball, `tailscale_<version>_{1}.tgz`",
            host_arch(),
            host_arch().go_arch()
        );
        assert_refused_after_asking_the_arch(&run, &fake, &expected, &hint);
    })
    .await;
}

/// A sandbox of the other architecture with only this machine's agent at hand: refused after
/// asking the sandbox, before any upload, with the command that builds the missing agent.
#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_without_an_agent_for_its_architecture_is_refused_before_any_upload() {
    let fake = FakeModal::start_with(FakeConfig {
        arch: other_arch(),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    bounded(async {
        let run = check(&fake, &[]).await;
        let expected = format!(
            "error: The sandbox is {0}, but no {0} agent was given (have: {1})",
            other_arch(),
            host_arch()
        );
        let hint = format!(
            "hint: Build the {} agent with `cargo xtask static-agent --target {}`",
            other_arch(),
            other_arch().rust_target()
        );
        assert_refused_after_asking_the_arch(&run, &fake, &expected, &hint);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dynamically_linked_agent_is_refused_before_anything_is_created() {
    let fake = FakeModal::start().await.unwrap();
    let dynamic = tokio::task::spawn_blocking(agent_binary).await.unwrap();
    bounded(async {
        let run = run(
            &fake,
            &[
                "check",
                "--sandbox",
                "modal",
                "--agent",
                dynamic.to_str().unwrap(),
            ],
            &[],
        )
        .await;
        run.assert_code(2);
        assert!(run.stderr.contains("dynamically linked"), "{}", run.stderr);
        assert!(
            run.stderr
                .contains("hint: Build it with `cargo xtask static-agent`"),
            "{}",
            run.stderr
        );
        assert!(fake.record().calls.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_without_chmod_is_an_infrastructure_error_and_still_cleaned_up() {
    let fake = FakeModal::start_with(FakeConfig {
        image_has_chmod: false,
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    bounded(async {
        let run = check(&fake, &[]).await;
        run.assert_code(3);
        assert!(run.stderr.contains("executable"), "{}", run.stderr);
        assert!(
            run.stderr.contains("hint: Use an image that has `chmod`"),
            "{}",
            run.stderr
        );
        assert!(fake.record().sandboxes[0].terminated_at.is_some());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_credentials_are_a_usage_error_that_never_shows_the_secret() {
    let fake = FakeModal::start().await.unwrap();
    bounded(async {
        let agent = static_agent();
        let run = run(
            &fake,
            &["check", "--sandbox", "modal", "--agent", &agent],
            &[("MODAL_TOKEN_SECRET", "as-wrong-hunter2")],
        )
        .await;
        run.assert_code(2);
        assert!(
            run.stderr.contains("MODAL_TOKEN_ID and MODAL_TOKEN_SECRET"),
            "{}",
            run.stderr
        );
        assert!(!run.stderr.contains("hunter2"), "{}", run.stderr);
        assert!(fake.record().sandboxes.is_empty());
    })
    .await;
}

/// Holds one phase open with fake latency, sends SIGINT once the fake sees that phase, and
/// checks the sandbox is terminated within 3 seconds and tailbox exits 130.
async fn interrupt_during(rpc: &str, reached: impl Fn(&Record) -> bool) {
    signal_during(libc::SIGINT, rpc, reached).await;
}

/// [`interrupt_during`] with any signal.
async fn signal_during(signal: i32, rpc: &str, reached: impl Fn(&Record) -> bool) {
    let fake = FakeModal::start().await.unwrap();
    fake.update_faults(|f| {
        f.latency.insert(rpc.to_owned(), Duration::from_secs(60));
    });
    let agent = static_agent();
    let home = tempfile::tempdir().unwrap();
    let mut child = command(
        &fake,
        home.path(),
        &["check", "--sandbox", "modal", "--json", "--agent", &agent],
        &[],
    )
    .spawn()
    .unwrap();
    let stderr_task = tailbox_testkit::collect_stderr(&mut child);
    let stdout = child.stdout.take().unwrap();
    let stdout_task = tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(_)) = lines.next_line().await {}
    });
    fake.wait_for(Duration::from_secs(60), |r| reached(r))
        .await
        .unwrap_or_else(|e| panic!("{rpc}: {e:#}"));
    let pid = i32::try_from(child.id().unwrap()).unwrap();
    let interrupted_at = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(pid, signal);
    }
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap_or_else(|_| panic!("{rpc}: tailbox did not exit after signal {signal}"))
        .unwrap();
    let _ = stdout_task.await;
    let stderr = stderr_task.await.unwrap();
    assert_eq!(status.code(), Some(130), "{rpc}: stderr:\n{stderr}");
    let record = fake.record();
    assert_eq!(record.sandboxes.len(), 1, "{rpc}");
    let terminated = record.sandboxes[0]
        .terminated_at
        .unwrap_or_else(|| panic!("{rpc}: the sandbox was not terminated; stderr:\n{stderr}"));
    let took = terminated.saturating_duration_since(interrupted_at);
    assert!(
        took < Duration::from_secs(3),
        "{rpc}: terminated {took:?} after signal {signal}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_while_the_create_response_is_in_flight_terminates_the_sandbox() {
    bounded(async {
        // The sandbox exists but its id never reached tailbox: it is found by the run's tag.
        interrupt_during("SandboxCreate", |r| !r.sandboxes.is_empty()).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_while_waiting_for_scheduling_terminates_the_sandbox() {
    bounded(async {
        interrupt_during("SandboxGetTaskId", |r| {
            !r.calls_of("SandboxGetTaskId").is_empty()
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_during_the_upload_terminates_the_sandbox() {
    bounded(async {
        interrupt_during("TaskExecStdinWriteStream", |r| {
            !r.calls_of("TaskExecStdinWriteStream").is_empty()
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_while_the_agent_runs_terminates_the_sandbox() {
    bounded(async {
        // The agent is running; its output is held back, so the handshake is pending.
        interrupt_during("TaskExecStdioRead", |r| !r.agent_execs().is_empty()).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_the_agent_runs_terminates_the_sandbox() {
    bounded(async {
        signal_during(libc::SIGTERM, "TaskExecStdioRead", |r| {
            !r.agent_execs().is_empty()
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn seeded_random_ctrl_c_always_terminates_the_sandbox_within_3_s() {
    let seed = tailbox_testkit::fault_seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let fake = FakeModal::start().await.unwrap();
    let agent = static_agent();
    bounded(async {
        // A clean run says how long a whole run takes here.
        let started = Instant::now();
        check(&fake, &[]).await.assert_code(0);
        let whole = started.elapsed();

        for run_no in 0..20 {
            let at = whole.mul_f64(rng.f64());
            let before = fake.record().sandboxes.len();
            let home = tempfile::tempdir().unwrap();
            let mut child = command(
                &fake,
                home.path(),
                &["check", "--sandbox", "modal", "--json", "--agent", &agent],
                &[],
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
            tokio::time::sleep(at).await;
            let interrupted_at = Instant::now();
            let pid = i32::try_from(child.id().unwrap()).unwrap();
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid, libc::SIGINT);
            }
            let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .unwrap_or_else(|_| panic!("seed {seed}, run {run_no} ({at:?}): no exit"))
                .unwrap();
            let record = fake.record();
            // 130 when interrupted; 0 if the run had already finished; killed by the signal
            // itself only before tailbox listens for it, when it has created nothing.
            let killed_early = std::os::unix::process::ExitStatusExt::signal(&status)
                == Some(libc::SIGINT)
                && record.sandboxes.len() == before;
            assert!(
                matches!(status.code(), Some(130 | 0)) || killed_early,
                "seed {seed}, run {run_no} (SIGINT at {at:?}): exit {status:?}"
            );
            let late = Record::late_terminations(
                &record.sandboxes[before..],
                interrupted_at,
                Duration::from_secs(3),
            );
            assert_eq!(
                late,
                Vec::<String>::new(),
                "seed {seed}, run {run_no} (SIGINT at {at:?})"
            );
        }
    })
    .await;
}
